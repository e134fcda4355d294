-- A fleet-wide pause of one model (a 429's Retry-After) that only ever lengthens: a shorter pause asked
-- for later never shortens the running one.
--
-- KEYS[1] the cooldown
-- ARGV[1] {pause_ms}
--
-- -> the pause left, in ms
local a = cjson.decode(ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left < a.pause_ms then
  redis.call('SET', KEYS[1], '1', 'PX', a.pause_ms)
  return a.pause_ms
end
return left
