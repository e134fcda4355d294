-- The recovery sweep's decision for one active run. A RUNNING run whose owner key has expired lost
-- its worker: while attempts remain it goes back to QUEUED as the next attempt, the reason appended
-- to its restarts; after the last one it ends FAILED with the reason (CANCELLED if a cancel was asked
-- for: nobody else would read the flag). Exactly one of any number of sweepers gets 'restart'.
--
-- KEYS[1] the run's hash, KEYS[2] its owner key, KEYS[3] the index of active runs, KEYS[4] its cancel flag,
-- KEYS[5] the index of queued runs (a restarted run waits there: run_resend.lua)
-- ARGV[1] {run_id, now, max_attempts, lease_s, finished (the final statuses, as {status: true})}
--
-- -> 'restart' (send run_rlm), 'failed', 'cancelled', or '' (nothing to do).
local a = cjson.decode(ARGV[1])
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur or a.finished[cur] then
  redis.call('ZREM', KEYS[3], a.run_id)
  return ''
end
local now = tonumber(a.now)
if cur ~= 'RUNNING' or redis.call('EXISTS', KEYS[2]) == 1 then return '' end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('HSET', KEYS[1], 'status', 'CANCELLED', 'finished_at', a.now, 'error', 'cancelled', 'error_detail', '')
  redis.call('ZREM', KEYS[3], a.run_id)
  return 'cancelled'
end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '1') or 1
local worker = redis.call('HGET', KEYS[1], 'worker') or '?'
local reason = 'worker ' .. worker .. ' stopped heartbeating (no claim renewal for ' .. a.lease_s ..
  's) during attempt ' .. attempt
local restarts = cjson.decode(redis.call('HGET', KEYS[1], 'restarts') or '[]')
table.insert(restarts, {at = now, attempt = attempt, reason = reason})
redis.call('HSET', KEYS[1], 'restarts', cjson.encode(restarts))
-- Attempts a shutting-down worker handed back (run_handback.lua) were not failures: not charged.
if attempt - tonumber(redis.call('HGET', KEYS[1], 'handbacks') or '0') >= a.max_attempts then
  redis.call('HSET', KEYS[1], 'status', 'FAILED', 'finished_at', a.now,
             'error', 'gave up after ' .. attempt .. ' attempt(s): ' .. reason, 'error_detail', '')
  redis.call('ZREM', KEYS[3], a.run_id)
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'attempt', attempt + 1)
redis.call('ZADD', KEYS[3], a.now, a.run_id)
redis.call('ZADD', KEYS[5], a.now, a.run_id)
return 'restart'
