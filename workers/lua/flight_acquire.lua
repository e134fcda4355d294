-- Take a single-flight lock, clearing wake-ups left over from an earlier flight; else report who holds it,
-- or the answer if a flight ended since the caller looked at the cache (its lock is gone then, and taking
-- it would pay for the prompt again: a sub-task looks all its prompts up at once, then asks them).
--
-- KEYS[1] the lock (inflight), KEYS[2] the wake-up list (done), KEYS[3] the cache entry
-- ARGV[1] {token, lease_ms}
--
-- -> {1, token, lease_ms} taken, {2, the cached value, 0} answered meanwhile, or {0, the holder's token,
--    the lock's PTTL in ms}
local a = cjson.decode(ARGV[1])
local cached = redis.call('GET', KEYS[3])
if cached then return {2, cached, 0} end
if redis.call('SET', KEYS[1], a.token, 'NX', 'PX', a.lease_ms) then
  redis.call('DEL', KEYS[2])
  return {1, a.token, a.lease_ms}
end
return {0, redis.call('GET', KEYS[1]) or '', redis.call('PTTL', KEYS[1])}
