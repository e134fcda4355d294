-- Take (or renew) a live-sandbox slot of a tree for one run, keeping `keep_free` slots for the run's
-- descendants (a chain below it must always find its sandboxes, or waiting parents would deadlock).
--
-- KEYS[1] the tree's live sandboxes (zset: run id -> lease expiry, unix seconds), KEYS[2] the tree's ledger
-- ARGV[1] {run_id, limit, keep_free, now, lease_s, expire_s}
--
-- -> 1 held, 0 not now (wait), -1 the tree has stopped
local a = cjson.decode(ARGV[1])
if redis.call('HEXISTS', KEYS[2], 'stopped') == 1 then return -1 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', a.now)  -- slots of dead workers' runs
if not redis.call('ZSCORE', KEYS[1], a.run_id) then
  if redis.call('ZCARD', KEYS[1]) + 1 + a.keep_free > a.limit then return 0 end
end
redis.call('ZADD', KEYS[1], a.now + a.lease_s, a.run_id)
redis.call('EXPIRE', KEYS[1], a.expire_s)
return 1
