-- One request asks the fleet's limiter of one model for a slot (workers.adaptive_limit), on Redis's clock:
-- wait out a cooldown; refuse while `cap` leases are live (expired ones, a dead worker's, dropped
-- first); then GCRA at the learned rate (times `margin`, capped by `ceiling_rps`; a burst may spend half
-- of what the provider last said remains, up to a second's worth; before anything is learned, only
-- the ceiling if one is set) and, when a token budget is known,
-- the TPM bucket charged with the request's estimate. A grant adds a lease expiring after `lease_us`.
-- A caller's turn at most `reserve_us` away is granted at once, to start then (wait_us): the callers
-- waiting on the rate are each given their own time, where refusing them all made every one of them
-- ask again at each interval (~80 scripts per request at 128 waiters).
--
-- KEYS[1] the limiter's state hash, KEYS[2] the requests' TAT, KEYS[3] the tokens' TAT, KEYS[4] the
--         cooldown, KEYS[5] the in-flight leases (sorted set scored by expiry)
-- ARGV[1] {initial_rps, ceiling_rps (0: none), burst, margin, ceiling_tpm (0: none), tokens, cap (0: none),
--          lease_us, slot, reserve_us (0: grant only what may start now)}
--
-- -> {allowed, wait_us (allowed: when to start), now_us, why, tokens charged}; why: 0 rate or cooldown,
--    1 the in-flight cap
if redis.replicate_commands then redis.replicate_commands() end
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause = redis.call('PTTL', KEYS[4])
if pause > 0 then return {0, pause * 1000, now, 0} end

local cap = a.cap
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  if redis.call('ZCARD', KEYS[5]) >= cap then
    local first = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
    return {0, math.max(1000, tonumber(first[2]) - now), now, 1}
  end
end

-- Until the provider has said its limit (headers) or refused a request (a 429), nothing is known that
-- a rate could be based on: only the in-flight cap (and the operator's ceiling) bound the requests.
local mode = redis.call('HGET', KEYS[1], 'mode') or 'start'
local ceiling = a.ceiling_rps
local wait, new_tat = -1, nil
if mode ~= 'start' or ceiling > 0 then
  local rate = tonumber(redis.call('HGET', KEYS[1], 'rate') or a.initial_rps) * a.margin
  if mode == 'start' or (ceiling > 0 and rate > ceiling) then rate = ceiling end
  local interval = 1000000 / rate
  -- Spend up to half of what the provider last said remains (at most a second's worth) at once.
  local left = math.floor(tonumber(redis.call('HGET', KEYS[1], 'rrem') or 0) / 2)
  local burst = math.max(a.burst, math.min(left, rate))
  local tat = math.max(tonumber(redis.call('GET', KEYS[2]) or 0), now)
  new_tat = tat + interval
  wait = new_tat - now - burst * interval
end

local tpm = tonumber(redis.call('HGET', KEYS[1], 'tpm') or 0)
local tpm_ceiling = a.ceiling_tpm
if tpm_ceiling > 0 and (tpm <= 0 or tpm > tpm_ceiling) then tpm = tpm_ceiling end
local tokens = a.tokens
local tok_new, cost = 0, 0
if tpm > 0 and tokens > 0 then
  local tok_interval = 60000000 / tpm
  cost = math.min(tokens, tpm)  -- bigger than the whole budget: passes once it is full
  local tok_tat = math.max(tonumber(redis.call('GET', KEYS[3]) or 0), now)
  tok_new = tok_tat + cost * tok_interval
  wait = math.max(wait, tok_new - now - tpm * tok_interval)
end
local start = 0
if wait > 0 then
  redis.call('HSET', KEYS[1], 'pressed', string.format('%.0f', now))
  if wait > a.reserve_us then return {0, math.ceil(wait), now, 0} end
  start = math.ceil(wait)
end
if new_tat then
  redis.call('SET', KEYS[2], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
end
if tok_new > 0 then
  redis.call('SET', KEYS[3], string.format('%.0f', tok_new), 'PX', math.ceil((tok_new - now) / 1000) + 1)
end
if cap > 0 then
  redis.call('ZADD', KEYS[5], now + start + a.lease_us, a.slot)
  redis.call('PEXPIRE', KEYS[5], math.ceil((a.reserve_us + a.lease_us) / 1000) + 1000)
end
return {1, start, now, 0, cost}
