-- Count the end of one of a job's runs, once: its status, its usage, whether its item is answered;
-- then end the job if nothing is left (every item stored, fed and settled, nothing to retry).
--
-- KEYS[1] the job's hash, KEYS[2] its active runs (zset), KEYS[3] its unanswered items (hash index -> status), KEYS[4] retry list
-- ARGV[1] {run_id, index, status, now, usage: {name: number}}
--
-- -> 1 counted now, 0 counted before (or never fed: not in the active set)
local a = cjson.decode(ARGV[1])
if redis.call('ZREM', KEYS[2], a.run_id) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'n:' .. a.status, 1)
for name, value in pairs(a.usage) do
  if value ~= 0 then redis.call('HINCRBYFLOAT', KEYS[1], 'u:' .. name, value) end
end
if a.status == 'SUCCEEDED' then
  redis.call('HDEL', KEYS[3], a.index)
else
  redis.call('HSET', KEYS[3], a.index, a.status)
end
redis.call('HSETNX', KEYS[1], 'first_result_at', a.now)
local h = redis.call('HMGET', KEYS[1], 'status', 'total', 'cursor')
if h[1] == 'RUNNING' and h[2] and tonumber(h[3]) >= tonumber(h[2])
    and redis.call('ZCARD', KEYS[2]) == 0 and redis.call('LLEN', KEYS[4]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'DONE', 'finished_at', a.now)
end
return 1
