-- Store a run's progress, if the writer's attempt still runs it.
--
-- KEYS[1] the run's hash
-- ARGV[1] {attempt}, ARGV[2] the progress JSON
--
-- -> 1 stored, 0 refused (the run finished or moved on to another attempt).
local a = cjson.decode(ARGV[1])
if redis.call('HGET', KEYS[1], 'status') ~= 'RUNNING' then return 0 end
if (redis.call('HGET', KEYS[1], 'attempt') or '1') ~= tostring(a.attempt) then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[2])
return 1
