-- A reply came back: release its slot, wake one waiter, and learn the model's limit from the reply
-- (workers.adaptive_limit). With rate-limit headers the rate is the geometric mean of the tightest bounds
-- seen so far (an upper bound alone is used as is), bounds widening slowly (~10 min); without them no
-- throttle until the first 429. Its burst's other replies are still on their way then (a 429 comes back
-- at once, a success after the model's latency), so the rate is only provisional while they land
-- ('settle'); once every request sent before the 429 has replied (and >= 1 s), AIMD starts at 0.9x the
-- best second of successes: +0.03/s per success, x0.7 on later 429s (once a second).
-- Increases only while callers wait on the limiter. The token bucket is corrected by actual - estimate.
--
-- KEYS[1] the limiter's state hash, KEYS[2] the tokens' TAT, KEYS[3] the in-flight leases, KEYS[4] the
--         list that wakes a waiter for a slot, KEYS[5] the requests' TAT
-- ARGV[1] {slot, outcome ('ok' | 'limited' | 'failed'), initial_rps, margin, ceiling_rps (0: none),
--          ceiling_tpm (0: none), cap (0: none), lease_us (a lease's life), correction (actual - charged tokens),
--          requests, tokens (each absent when the reply had no such headers, else {low, high (absent:
--          unbounded), limit}), headroom (absent: no headers), remaining (absent: not stated)}
--
-- -> the new base rate (requests/s, before margin and ceiling), as a string
if redis.replicate_commands then redis.replicate_commands() end
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if redis.call('ZREM', KEYS[3], a.slot) == 1 then
  redis.call('LPUSH', KEYS[4], '1')
  redis.call('LTRIM', KEYS[4], 0, math.max(0, a.cap - 1))
  redis.call('PEXPIRE', KEYS[4], 60000)
end
local s = {}
local raw = redis.call('HGETALL', KEYS[1])
for i = 1, #raw, 2 do s[raw[i]] = raw[i + 1] end
local rate = tonumber(s.rate or a.initial_rps)
local mode = s.mode or 'start'
local outcome = a.outcome
local pressed = now - tonumber(s.pressed or 0) < 1000000

-- Tightest bounds so far; they widen by up to half over ~10 min, and reset on a new limit.
local function learn(prefix, bounds)
  if not bounds then return nil end
  local low, high, limit = bounds.low, bounds.high or 1e308, bounds.limit
  local lo, hi = tonumber(s[prefix .. 'lo'] or 0), tonumber(s[prefix .. 'hi'] or -1)
  local dt = (now - tonumber(s[prefix .. 'at'] or now)) / 1000000
  local widen = math.max(0.5, 1 - dt / 600)
  if tonumber(s[prefix .. 'lim'] or -1) ~= limit then lo, hi = 0, -1 end
  lo = math.max(lo * widen, low)
  if hi < 0 or hi >= 1e300 or hi / widen > high then hi = high else hi = hi / widen end
  if hi < lo then hi = lo end
  s[prefix .. 'lo'], s[prefix .. 'hi'], s[prefix .. 'lim'], s[prefix .. 'at'] = lo, hi, limit, now
  if lo > 0 and hi < 1e300 then return math.sqrt(lo * hi), hi end
  if hi < 1e300 then return hi, hi end  -- a near-full bucket bounds the rate from above only
  if lo > 0 then return lo, hi end
  return nil, hi
end

-- Before headers or a 429 nothing throttles (limit_acquire): count the successes per second
-- (the best 1-s window so far), so the AIMD starts from the rate actually achieved.
local function achieved()
  local span = math.max((now - tonumber(s.wat or now)) / 1000000, 1)
  return math.max(tonumber(s.ach or 0), tonumber(s.wn or 0) / span)
end
if (mode == 'start' or mode == 'settle') and outcome == 'ok' then
  local wat, wn = tonumber(s.wat or now), tonumber(s.wn or 0) + 1
  local span = (now - wat) / 1000000
  if span >= 1 then
    s.ach = math.max(tonumber(s.ach or 0), wn / span)
    wat, wn = now, 0
  end
  s.wat, s.wn = wat, wn
end

local est, upper = learn('r', a.requests)
local headroom = a.headroom or -1
if a.remaining then s.rrem = a.remaining end
if est then
  rate, mode = est, 'headers'
elseif outcome == 'ok' and pressed and mode ~= 'settle' and (mode ~= 'headers' or headroom > 0.5) then
  if mode == 'avoid' then rate = rate + 0.03 else rate = rate + 1 end
end
if upper and upper < 1e300 and rate > upper then rate = upper end
if outcome == 'limited' and now - tonumber(s.dec or 0) > 1000000 then
  if mode == 'headers' then
    s.rhi = math.max(tonumber(s.rlo or 0), math.min(tonumber(s.rhi or rate), rate) * 0.9)
    rate = rate * 0.9
  elseif mode == 'start' then
    -- The first refusal: pace at a provisional rate (what succeeded so far, or half the initial
    -- rate) until the requests already sent have replied; their successes count.
    local so_far = achieved()
    if so_far > 0 then rate = so_far * 0.7 else rate = rate * 0.5 end
    mode, s.sat = 'settle', now
  elseif mode == 'avoid' then
    rate = rate * 0.7
  end  -- while settling, a 429 is the burst's tail: already counted in
  s.dec = now
end
-- Settled when no request leased before the first 429 is still out (leases expire after lease_us),
-- and at least a second has passed; without leases (no cap), after a second.
if mode == 'settle' and now - tonumber(s.sat) >= 1000000 then
  local sent_before = 0
  if a.cap > 0 then sent_before = redis.call('ZCOUNT', KEYS[3], now, tonumber(s.sat) + a.lease_us) end
  if sent_before == 0 then
    rate = math.max(rate, achieved() * 0.9)
    mode = 'avoid'
  end
end
rate = math.min(math.max(rate, 0.2), 100000)
-- The GCRA's backlog (TAT - now) was built at the old rate: rescale it to the new one, so a
-- limit learned on the first reply is used at once, not after the slow start's queue drains.
-- (The rate limit_acquire paces at: before anything is learned, only the ceiling; 0 for none.)
local function effective(r, m)
  local ceiling = a.ceiling_rps
  if m == 'start' then return ceiling end
  r = r * a.margin
  if ceiling > 0 and r > ceiling then r = ceiling end
  return r
end
local old = effective(tonumber(s.rate or a.initial_rps), s.mode or 'start')
local new = effective(rate, mode)
if new ~= old and old > 0 and new > 0 then
  local tat = tonumber(redis.call('GET', KEYS[5]) or 0)
  if tat > now then
    tat = now + (tat - now) * old / new
    redis.call('SET', KEYS[5], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
end
s.rate, s.mode = rate, mode

local test = learn('t', a.tokens)
if test then s.tpm = test * 60 end
local tpm = tonumber(s.tpm or 0)
local tpm_ceiling = a.ceiling_tpm
if tpm_ceiling > 0 and (tpm <= 0 or tpm > tpm_ceiling) then tpm = tpm_ceiling end
local correction = a.correction
if tpm > 0 and correction ~= 0 then
  local tok_tat = tonumber(redis.call('GET', KEYS[2]) or now)
  tok_tat = math.max(now, tok_tat + correction * 60000000 / tpm)
  redis.call('SET', KEYS[2], string.format('%.0f', tok_tat), 'PX', math.ceil((tok_tat - now) / 1000) + 1)
end
local flat = {}
for k, v in pairs(s) do
  flat[#flat + 1] = k
  flat[#flat + 1] = (type(v) == 'number') and string.format('%.17g', v) or v
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('PEXPIRE', KEYS[1], 86400000)
return tostring(rate)
