-- Extend a single-flight lock while it is still this leader's.
--
-- KEYS[1] the lock (inflight)
-- ARGV[1] {token, lease_ms}
--
-- -> 1 extended, 0 the lock is gone or another's
local a = cjson.decode(ARGV[1])
if redis.call('GET', KEYS[1]) == a.token then return redis.call('PEXPIRE', KEYS[1], a.lease_ms) end
return 0
