-- End a flight: store its value (when it is to be cached), release the lock if it is still this leader's,
-- then push one wake-up for the waiters. One round trip: the value is in the cache before anyone wakes.
--
-- KEYS[1] the lock (inflight), KEYS[2] the wake-up list (done), KEYS[3] the cache entry
-- ARGV[1] {token, done_ttl_ms, ttl_s}, ARGV[2] the wake-up message (JSON, pushed as it is),
-- ARGV[3] (absent: nothing to cache) the value (JSON, stored as it is for ttl_s seconds)
--
-- -> 1
local a = cjson.decode(ARGV[1])
if ARGV[3] then redis.call('SET', KEYS[3], ARGV[3], 'EX', a.ttl_s) end
if redis.call('GET', KEYS[1]) == a.token then redis.call('DEL', KEYS[1]) end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[2], a.done_ttl_ms)
return 1
