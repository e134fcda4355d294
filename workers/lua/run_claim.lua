-- Claim a QUEUED run for one attempt: it becomes RUNNING, held by one execution.
--
-- KEYS[1] the run's hash, KEYS[2] its owner key, KEYS[3] the index of active runs, KEYS[4] that of queued runs
-- ARGV[1] {run_id, owner, worker, ttl_ms, now}
--
-- -> the attempt claimed (the owner key then holds "<attempt>|<owner>" for ttl_ms), or 0: the run is
--    not QUEUED or another execution holds it, so a duplicate delivery never runs twice. A call
--    repeating a claim this owner already holds (a retried call whose reply was lost) gets its attempt.
local a = cjson.decode(ARGV[1])
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '1') or 1
local token = attempt .. '|' .. a.owner
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'RUNNING' and redis.call('GET', KEYS[2]) == token then return attempt end
if status ~= 'QUEUED' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[2], token, 'PX', a.ttl_ms)
redis.call('HSET', KEYS[1], 'status', 'RUNNING', 'worker', a.worker, 'started_at', a.now, 'attempt', attempt)
redis.call('ZADD', KEYS[3], a.now, a.run_id)
redis.call('ZREM', KEYS[4], a.run_id)
return attempt
