-- The end of a run: its final status, error, last progress and result document. Written by the worker
-- that runs it (fenced by its attempt) and by a client cancelling a run that is still QUEUED.
--
-- KEYS[1] the run's hash, KEYS[2] its result, KEYS[3] its owner key, KEYS[4] the index of active runs,
-- KEYS[5] the fleet's rlmq_runs_total counter, KEYS[6] its rlmq_run_duration_seconds histogram
-- (rlmq.store.metrics: a run is counted by the write that ends it, once)
-- ARGV[1] {run_id, status, finished_at, error, error_detail, finished (the final statuses, as {status: true}),
--          attempt (absent: any), expect (absent: any unfinished status), expire_s (absent: keep),
--          buckets (the histogram's upper bounds, ascending)}
-- ARGV[2] the progress JSON ('' keeps the stored one), ARGV[3] the result JSON ('' stores none)
--
-- -> 1 written, or 0 refused: the run has ended already, or is not at the expected status, or has
--    moved on to another attempt. A call repeating what its attempt already wrote (a retried call
--    whose reply was lost) is answered 1 again, so the write is idempotent.
local a = cjson.decode(ARGV[1])
local cur = redis.call('HGET', KEYS[1], 'status')
local attempt = a.attempt and tostring(a.attempt)
local ours = attempt == nil or (redis.call('HGET', KEYS[1], 'attempt') or '1') == attempt
if not cur then return 0 end
if a.finished[cur] then
  if attempt and ours and cur == a.status then return 1 end
  return 0
end
if a.expect and cur ~= a.expect then return 0 end
if not ours then return 0 end
redis.call('HSET', KEYS[1], 'status', a.status, 'finished_at', a.finished_at, 'error', a.error,
           'error_detail', a.error_detail)
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3]) end
if a.expire_s then
  redis.call('EXPIRE', KEYS[1], a.expire_s)
  if ARGV[3] ~= '' then redis.call('EXPIRE', KEYS[2], a.expire_s) end
end
redis.call('ZREM', KEYS[4], a.run_id)
redis.call('HINCRBY', KEYS[5], cjson.encode({a.status}), 1)
local started = tonumber(redis.call('HGET', KEYS[1], 'started_at') or '')
if started then  -- a run cancelled while QUEUED never started: no duration
  local seconds = math.max(0, tonumber(a.finished_at) - started)
  local bucket = 'inf'
  for i, bound in ipairs(a.buckets) do
    if seconds <= bound then bucket = tostring(i); break end
  end
  redis.call('HINCRBY', KEYS[6], bucket, 1)
  redis.call('HINCRBY', KEYS[6], 'count', 1)
  redis.call('HINCRBYFLOAT', KEYS[6], 'sum', string.format('%.6f', seconds))
end
local held = redis.call('GET', KEYS[3])
if held and attempt and string.sub(held, 1, #attempt + 1) == attempt .. '|' then
  redis.call('DEL', KEYS[3])
end
return 1
