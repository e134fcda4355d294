"""The Lua scripts behind ``RunStore``'s writes: each check-and-write of a run record is atomic.

Fencing: a run's hash holds its ``attempt`` (1 for the first start). The worker executing attempt
``n`` claims ``keys.run_owner_key`` with the value ``"n|owner"`` and passes ``n`` with every write
of progress and of the final state; once the recovery sweep has moved the run to attempt ``n+1``,
every write of attempt ``n`` is refused, so an old owner that was only cut off (a partition, a
stalled process) can never overwrite what the new attempt does.

Recovery (``RECOVER``): a RUNNING run whose owner key has expired lost its worker. While attempts
remain it goes back to QUEUED with ``attempt+1`` and the reason appended to ``restarts`` (the
caller then sends ``run_rlm`` again); after the last attempt it ends FAILED with the reason.
"""

from __future__ import annotations

__all__ = ["CLAIM", "FINISH", "RECOVER", "RENEW", "SET_PROGRESS"]

# KEYS: run, owner, active   ARGV: owner, ttl_ms, worker, now, run_id
# -> the attempt claimed, or 0 (not QUEUED, or owned): a duplicate delivery never runs twice.
CLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'QUEUED' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '1') or 1
redis.call('SET', KEYS[2], attempt .. '|' .. ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'RUNNING', 'worker', ARGV[3], 'started_at', ARGV[4], 'attempt', attempt)
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
return attempt
"""

# KEYS: run, owner   ARGV: attempt, owner, ttl_ms
# -> 1 while this attempt still runs the run (re-taking a claim that lapsed with nobody else
#    taking over), 0 once it has been fenced off.
RENEW = """
if redis.call('HGET', KEYS[1], 'status') ~= 'RUNNING' then return 0 end
if (redis.call('HGET', KEYS[1], 'attempt') or '1') ~= ARGV[1] then return 0 end
local token = ARGV[1] .. '|' .. ARGV[2]
local held = redis.call('GET', KEYS[2])
if held and held ~= token then return 0 end
redis.call('SET', KEYS[2], token, 'PX', ARGV[3])
return 1
"""

# KEYS: run   ARGV: attempt, progress-json
SET_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'RUNNING' then return 0 end
if (redis.call('HGET', KEYS[1], 'attempt') or '1') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[2])
return 1
"""

# KEYS: run, result, owner, active
# ARGV: attempt ('' = any), expected status ('' = any unfinished), status, finished_at, error,
#       error_detail, progress ('' = keep), result ('' = none), expire_s ('' = none), run_id
FINISH = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur or cur == 'SUCCEEDED' or cur == 'FAILED' or cur == 'CANCELLED' or cur == 'STOPPED' then return 0 end
if ARGV[2] ~= '' and cur ~= ARGV[2] then return 0 end
if ARGV[1] ~= '' and (redis.call('HGET', KEYS[1], 'attempt') or '1') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'finished_at', ARGV[4], 'error', ARGV[5], 'error_detail', ARGV[6])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[7]) end
if ARGV[8] ~= '' then redis.call('SET', KEYS[2], ARGV[8]) end
if ARGV[9] ~= '' then
  redis.call('EXPIRE', KEYS[1], ARGV[9])
  if ARGV[8] ~= '' then redis.call('EXPIRE', KEYS[2], ARGV[9]) end
end
redis.call('ZREM', KEYS[4], ARGV[10])
local held = redis.call('GET', KEYS[3])
if held and ARGV[1] ~= '' and string.sub(held, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
  redis.call('DEL', KEYS[3])
end
return 1
"""

# KEYS: run, owner, active, cancel   ARGV: run_id, now, max_attempts, lease_s, resend_after_s
# -> 'restart' (QUEUED again as the next attempt: send run_rlm), 'resend' (restarted long ago
#    and never claimed: send it again), 'failed' (out of attempts), 'cancelled' (its owner died
#    after a cancel was asked for), or '' (nothing to do).
RECOVER = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur or cur == 'SUCCEEDED' or cur == 'FAILED' or cur == 'CANCELLED' or cur == 'STOPPED' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return ''
end
local now = tonumber(ARGV[2])
if cur == 'QUEUED' then
  local since = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]) or now)
  if now - since < tonumber(ARGV[5]) then return '' end
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  return 'resend'
end
if cur ~= 'RUNNING' or redis.call('EXISTS', KEYS[2]) == 1 then return '' end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('HSET', KEYS[1], 'status', 'CANCELLED', 'finished_at', ARGV[2], 'error', 'cancelled', 'error_detail', '')
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 'cancelled'
end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '1') or 1
local worker = redis.call('HGET', KEYS[1], 'worker') or '?'
local reason = 'worker ' .. worker .. ' stopped heartbeating (no claim renewal for ' .. ARGV[4] .. 's) during attempt ' .. attempt
local restarts = cjson.decode(redis.call('HGET', KEYS[1], 'restarts') or '[]')
table.insert(restarts, {at = now, attempt = attempt, reason = reason})
redis.call('HSET', KEYS[1], 'restarts', cjson.encode(restarts))
if attempt >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'status', 'FAILED', 'finished_at', ARGV[2],
             'error', 'gave up after ' .. attempt .. ' attempt(s): ' .. reason, 'error_detail', '')
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'attempt', attempt + 1)
redis.call('ZADD', KEYS[3], now, ARGV[1])
return 'restart'
"""
