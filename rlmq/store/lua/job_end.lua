-- End a job CANCELLED or STOPPED, unless it has ended already (a settle may have made it DONE just now).
--
-- KEYS[1] the job's hash
-- ARGV[1] {status, error, now}
--
-- -> 1 ended now, 0 it had ended (or does not exist)
local a = cjson.decode(ARGV[1])
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'DONE' or status == 'CANCELLED' or status == 'STOPPED' then return 0 end
redis.call('HSET', KEYS[1], 'status', a.status, 'error', a.error, 'finished_at', a.now)
return 1
