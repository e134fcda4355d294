-- A worker that is shutting down hands a run it owns back to the queue: QUEUED again as the next attempt,
-- the reason appended to its restarts, its claim dropped. A hand-back is not a failure: it is counted
-- in 'handbacks' and recovery does not charge it against the run's attempts. Refused (0) unless this
-- attempt still owns the run, so a fenced-off or finished attempt cannot requeue it.
--
-- KEYS[1] the run's hash, KEYS[2] its owner key, KEYS[3] the index of active runs, KEYS[4] that of queued runs
-- ARGV[1] {run_id, attempt, owner, now, reason}
--
-- -> 1 handed back (send run_rlm again), 0 not this attempt's to hand back.
local a = cjson.decode(ARGV[1])
local attempt = tostring(a.attempt)
if redis.call('HGET', KEYS[1], 'status') ~= 'RUNNING' then return 0 end
if (redis.call('HGET', KEYS[1], 'attempt') or '1') ~= attempt then return 0 end
local held = redis.call('GET', KEYS[2])
if held and held ~= attempt .. '|' .. a.owner then return 0 end
local restarts = cjson.decode(redis.call('HGET', KEYS[1], 'restarts') or '[]')
table.insert(restarts, {at = tonumber(a.now), attempt = a.attempt, reason = a.reason, handback = true})
redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'attempt', a.attempt + 1, 'restarts', cjson.encode(restarts))
redis.call('HINCRBY', KEYS[1], 'handbacks', 1)
redis.call('DEL', KEYS[2])
redis.call('ZADD', KEYS[3], a.now, a.run_id)
redis.call('ZADD', KEYS[4], a.now, a.run_id)
return 1
