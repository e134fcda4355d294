-- Keep an attempt's claim on its run, re-taking a claim that lapsed while nobody else took over
-- (Redis was away longer than the claim's TTL).
--
-- A run's tick also asks here what else it must know each second, in the same round trip:
-- KEYS[3] (optional) its worker's draining mark, KEYS[4..] the cancel marks of the run and its tree's root.
--
-- KEYS[1] the run's hash, KEYS[2] its owner key
-- ARGV[1] {attempt, owner, ttl_ms}
--
-- -> 0 once this attempt has been fenced off (it must stop); else 1, plus 2 when a cancel was asked
--    for, plus 4 when its worker is draining.
local a = cjson.decode(ARGV[1])
local attempt = tostring(a.attempt)
if redis.call('HGET', KEYS[1], 'status') ~= 'RUNNING' then return 0 end
if (redis.call('HGET', KEYS[1], 'attempt') or '1') ~= attempt then return 0 end
local token = attempt .. '|' .. a.owner
local held = redis.call('GET', KEYS[2])
if held and held ~= token then return 0 end
redis.call('SET', KEYS[2], token, 'PX', a.ttl_ms)
local out = 1
if #KEYS >= 3 and redis.call('EXISTS', KEYS[3]) == 1 then out = out + 4 end
for i = 4, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then out = out + 2; break end
end
return out
