-- Whether a run left in the index of queued runs is to be sent again: it is still QUEUED and was last sent
-- before stale_before (its message was lost: popped by a consumer whose connection then broke, acked by a
-- worker that died before claiming it, or never written by a promoted replica). Exactly one of any number
-- of sweepers gets 1: the score moves to now. A run no longer QUEUED leaves the index.
--
-- KEYS[1] the run's hash, KEYS[2] the index of queued runs
-- ARGV[1] {run_id, now, stale_before}; called only while the rlm queue is empty (a waiting message may be the run's own)
--
-- -> 1 send run_rlm again, 0 not now.
local a = cjson.decode(ARGV[1])
if redis.call('HGET', KEYS[1], 'status') ~= 'QUEUED' then
  redis.call('ZREM', KEYS[2], a.run_id)
  return 0
end
local since = tonumber(redis.call('ZSCORE', KEYS[2], a.run_id))
if not since or since > tonumber(a.stale_before) then return 0 end
redis.call('ZADD', KEYS[2], a.now, a.run_id)
return 1
