-- End a flight: release the lock if it is still this leader's, then push one wake-up for the waiters.
--
-- KEYS[1] the lock (inflight), KEYS[2] the wake-up list (done)
-- ARGV[1] {token, done_ttl_ms}, ARGV[2] the wake-up message (JSON, pushed as it is)
--
-- -> 1
local a = cjson.decode(ARGV[1])
if redis.call('GET', KEYS[1]) == a.token then redis.call('DEL', KEYS[1]) end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[2], a.done_ttl_ms)
return 1
