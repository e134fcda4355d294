-- Take the next items of a job to run, at most max_active runs of the job queued or running at once.
-- The retry list comes first (a quote's sample in round 0, resume --retry-failed's items in later rounds),
-- then the cursor moves on through the items stored so far, skipping the sampled ones. A QUOTING job
-- runs its sample only.
--
-- KEYS[1] the job's hash, KEYS[2] its active runs (zset), KEYS[3] its retry list, KEYS[4] its reruns hash,
-- KEYS[5] its sampled items (set)
-- ARGV[1] {job_id, now}
--
-- A RUNNING job with every item fed and no run active is DONE (its last run settled before it was sealed).
-- -> a flat list {run_id, index, run_id, index, ...} of the runs to create and send now; empty when the job
--    is not RUNNING/SUBMITTING, is full, or has nothing left to feed. Each run id is made from the job id,
--    the item index and the retry round, so feeding the same item again can only name the same run.
local a = cjson.decode(ARGV[1])
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'RUNNING' and status ~= 'SUBMITTING' and status ~= 'QUOTING' then return {} end
local max_active = tonumber(redis.call('HGET', KEYS[1], 'max_active') or '0')
local free = max_active - redis.call('ZCARD', KEYS[2])
local out = {}
local function take(run_id, index)
  redis.call('ZADD', KEYS[2], a.now, run_id)
  out[#out + 1] = run_id
  out[#out + 1] = index
  free = free - 1
end
local round = redis.call('HGET', KEYS[1], 'round') or '0'
while free > 0 do
  local index = redis.call('LPOP', KEYS[3])
  if not index then break end
  if round == '0' then  -- a sampled item's first run
    take(a.job_id .. '-' .. index, index)
  else
    local run_id = a.job_id .. '-' .. index .. '.r' .. round
    redis.call('HSET', KEYS[4], index, run_id)
    take(run_id, index)
  end
end
if status == 'QUOTING' then return out end
local cursor = tonumber(redis.call('HGET', KEYS[1], 'cursor') or '0')
local stored = tonumber(redis.call('HGET', KEYS[1], 'stored') or '0')
while free > 0 and cursor < stored do
  if redis.call('SISMEMBER', KEYS[5], cursor) == 0 then take(a.job_id .. '-' .. cursor, tostring(cursor)) end
  cursor = cursor + 1
end
redis.call('HSET', KEYS[1], 'cursor', cursor)
local total = redis.call('HGET', KEYS[1], 'total')
if #out == 0 and status == 'RUNNING' and total and cursor >= tonumber(total) and redis.call('ZCARD', KEYS[2]) == 0
    and redis.call('LLEN', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'DONE', 'finished_at', a.now)  -- every run settled before the seal
end
return out
