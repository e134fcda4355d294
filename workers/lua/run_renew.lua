-- Keep an attempt's claim on its run, re-taking a claim that lapsed while nobody else took over
-- (Redis was away longer than the claim's TTL).
--
-- KEYS[1] the run's hash, KEYS[2] its owner key
-- ARGV[1] {attempt, owner, ttl_ms}
--
-- -> 1 while this attempt still runs the run, 0 once it has been fenced off (it must stop).
local a = cjson.decode(ARGV[1])
local attempt = tostring(a.attempt)
if redis.call('HGET', KEYS[1], 'status') ~= 'RUNNING' then return 0 end
if (redis.call('HGET', KEYS[1], 'attempt') or '1') ~= attempt then return 0 end
local token = attempt .. '|' .. a.owner
local held = redis.call('GET', KEYS[2])
if held and held ~= token then return 0 end
redis.call('SET', KEYS[2], token, 'PX', a.ttl_ms)
return 1
