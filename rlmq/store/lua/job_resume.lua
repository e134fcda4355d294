-- Make a stopped, cancelled or finished job RUNNING again; with retry, queue its unanswered items to run
-- again in a new round (their counts move from their last status back to unsettled).
--
-- KEYS[1] the job's hash, KEYS[2] its unanswered items (hash index -> status), KEYS[3] its retry list
-- ARGV[1] {retry (bool)}
--
-- -> the number of items queued to run again, or -1 if the job is still being submitted or quoted
local a = cjson.decode(ARGV[1])
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'SUBMITTING' or status == 'QUOTING' then return -1 end
local n = 0
if a.retry then
  local pairs_ = redis.call('HGETALL', KEYS[2])
  for i = 1, #pairs_, 2 do
    redis.call('HINCRBY', KEYS[1], 'n:' .. pairs_[i + 1], -1)
    redis.call('RPUSH', KEYS[3], pairs_[i])
    n = n + 1
  end
  redis.call('DEL', KEYS[2])
  if n > 0 then redis.call('HINCRBY', KEYS[1], 'round', 1) end
end
redis.call('HSET', KEYS[1], 'status', 'RUNNING')
redis.call('HDEL', KEYS[1], 'finished_at', 'error')
return n
