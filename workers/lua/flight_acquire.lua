-- Take a single-flight lock, clearing wake-ups left over from an earlier flight; else report who holds it.
--
-- KEYS[1] the lock (inflight), KEYS[2] the wake-up list (done)
-- ARGV[1] {token, lease_ms}
--
-- -> {1, token, lease_ms} taken, or {0, the holder's token, the lock's PTTL in ms}
local a = cjson.decode(ARGV[1])
if redis.call('SET', KEYS[1], a.token, 'NX', 'PX', a.lease_ms) then
  redis.call('DEL', KEYS[2])
  return {1, a.token, a.lease_ms}
end
return {0, redis.call('GET', KEYS[1]) or '', redis.call('PTTL', KEYS[1])}
