"""A fleet-wide limiter that learns each provider's limit: GCRA at a learned rate, a TPM bucket
charged with actual usage, a cap on in-flight requests with leases, and the shared cooldown.

State lives in Redis (``rlmq.store.keys``: ``limit``, ``rate``, ``tpm``, ``slots``, ``cooldown``), so
every worker process of the fleet obeys one limit per model. Two Lua scripts on Redis's clock:

- ``acquire``: wait out a cooldown; refuse while ``max_in_flight`` leases are live (expired
  leases, a dead worker's, are dropped first); then GCRA at the learned rate (times ``margin``,
  capped by the optional ceiling; a burst may spend half of what the provider last said
  remains, up to a second's worth) and, when a token budget is known, the TPM bucket charged
  with the request's estimate. A grant adds a lease (expiring after ``lease_seconds``).
- ``observe``: release the lease, wake one waiter, and learn from the reply. With rate-limit
  headers (``workers.rate_headers``) the limit is the geometric mean of the tightest bounds seen
  so far (an upper bound alone, from a near-full bucket, is used as is: the bucket absorbs the
  overshoot until lower bounds arrive); bounds widen slowly (~10 min), so a raised limit is
  found again. Without them, AIMD: +1 request/s per
  success in slow start (the rate doubles each second it is the bottleneck), +0.03 after it
  (3%/s); x0.5 on the first 429, x0.7 on later ones (once per second, however many arrive
  together). Increases only
  happen while callers are actually waiting on the limiter. A 429's ``Retry-After`` pauses the
  whole fleet (``cooldown``). The token bucket is corrected by ``actual - estimate`` tokens.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from rlmq.store.keys import (cooldown_key, limit_state_key, rate_limit_key, rate_limit_tokens_key, slots_free_key,
                       slots_key)
from workers.rate_headers import Bounds, parse_rate_headers

__all__ = ["AdaptiveLimiter", "Slot"]

# KEYS: state, requests TAT, tokens TAT, cooldown, slots.
# ARGV: initial rate, ceiling (0 none), burst, margin, tpm ceiling (0 none), tokens, cap (0 none),
#       lease us, slot id. Returns {allowed, wait_us, now_us, why, tokens charged} (why: 0 rate or
#       cooldown, 1 in-flight cap).
_ACQUIRE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause = redis.call('PTTL', KEYS[4])
if pause > 0 then return {0, pause * 1000, now, 0} end

local cap = tonumber(ARGV[7])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  if redis.call('ZCARD', KEYS[5]) >= cap then
    local first = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
    return {0, math.max(1000, tonumber(first[2]) - now), now, 1}
  end
end

local rate = tonumber(redis.call('HGET', KEYS[1], 'rate') or ARGV[1]) * tonumber(ARGV[4])
local ceiling = tonumber(ARGV[2])
if ceiling > 0 and rate > ceiling then rate = ceiling end
local interval = 1000000 / rate
-- Spend up to half of what the provider last said remains (at most a second's worth) at once.
local left = math.floor(tonumber(redis.call('HGET', KEYS[1], 'rrem') or 0) / 2)
local burst = math.max(tonumber(ARGV[3]), math.min(left, rate))
local tat = math.max(tonumber(redis.call('GET', KEYS[2]) or 0), now)
local new_tat = tat + interval
local wait = new_tat - now - burst * interval

local tpm = tonumber(redis.call('HGET', KEYS[1], 'tpm') or 0)
local tpm_ceiling = tonumber(ARGV[5])
if tpm_ceiling > 0 and (tpm <= 0 or tpm > tpm_ceiling) then tpm = tpm_ceiling end
local tokens = tonumber(ARGV[6])
local tok_new, cost = 0, 0
if tpm > 0 and tokens > 0 then
  local tok_interval = 60000000 / tpm
  cost = math.min(tokens, tpm)  -- bigger than the whole budget: passes once it is full
  local tok_tat = math.max(tonumber(redis.call('GET', KEYS[3]) or 0), now)
  tok_new = tok_tat + cost * tok_interval
  wait = math.max(wait, tok_new - now - tpm * tok_interval)
end
if wait > 0 then
  redis.call('HSET', KEYS[1], 'pressed', string.format('%.0f', now))
  return {0, math.ceil(wait), now, 0}
end
redis.call('SET', KEYS[2], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
if tok_new > 0 then
  redis.call('SET', KEYS[3], string.format('%.0f', tok_new), 'PX', math.ceil((tok_new - now) / 1000) + 1)
end
if cap > 0 then
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[8]), ARGV[9])
  redis.call('PEXPIRE', KEYS[5], math.ceil(tonumber(ARGV[8]) / 1000) + 1000)
end
return {1, 0, now, 0, cost}
"""

# KEYS: state, tokens TAT, slots, free list, requests TAT. ARGV: slot id, outcome (ok|limited|failed), initial
# rate, requests low, high, limit, headroom (-1: no headers), tokens low, high, limit, token
# correction (actual - charged), cap, tpm ceiling (0 none), margin, rate ceiling (0 none),
# requests remaining (-1: not stated). Bounds of -1 mean "not stated". Returns the new rate.
_OBSERVE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[4], '1')
  redis.call('LTRIM', KEYS[4], 0, math.max(0, tonumber(ARGV[12]) - 1))
  redis.call('PEXPIRE', KEYS[4], 60000)
end
local s = {}
local raw = redis.call('HGETALL', KEYS[1])
for i = 1, #raw, 2 do s[raw[i]] = raw[i + 1] end
local rate = tonumber(s.rate or ARGV[3])
local mode = s.mode or 'start'
local outcome = ARGV[2]
local pressed = now - tonumber(s.pressed or 0) < 1000000

-- Tightest bounds so far; they widen by up to half over ~10 min, and reset on a new limit.
local function learn(prefix, low, high, limit)
  if low < 0 then return nil end
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

local high = tonumber(ARGV[5]); if high < 0 then high = 1e308 end
local est, upper = learn('r', tonumber(ARGV[4]), high, tonumber(ARGV[6]))
local headroom = tonumber(ARGV[7])
if tonumber(ARGV[16]) >= 0 then s.rrem = tonumber(ARGV[16]) end
if est then
  rate, mode = est, 'headers'
elseif outcome == 'ok' and pressed and (mode ~= 'headers' or headroom > 0.5) then
  if mode == 'avoid' then rate = rate + 0.03 else rate = rate + 1 end
end
if upper and upper < 1e300 and rate > upper then rate = upper end
if outcome == 'limited' and now - tonumber(s.dec or 0) > 1000000 then
  if mode == 'headers' then
    s.rhi = math.max(tonumber(s.rlo or 0), math.min(tonumber(s.rhi or rate), rate) * 0.9)
    rate = rate * 0.9
  elseif mode == 'start' then
    rate, mode = rate * 0.5, 'avoid'  -- slow start overshot: halve, as TCP does
  else
    rate = rate * 0.7
  end
  s.dec = now
end
rate = math.min(math.max(rate, 0.2), 100000)
-- The GCRA's backlog (TAT - now) was built at the old rate: rescale it to the new one, so a
-- limit learned on the first reply is used at once, not after the slow start's queue drains.
local function effective(r)
  r = r * tonumber(ARGV[14])
  local ceiling = tonumber(ARGV[15])
  if ceiling > 0 and r > ceiling then r = ceiling end
  return r
end
local old = effective(tonumber(s.rate or ARGV[3]))
local new = effective(rate)
if new ~= old then
  local tat = tonumber(redis.call('GET', KEYS[5]) or 0)
  if tat > now then
    tat = now + (tat - now) * old / new
    redis.call('SET', KEYS[5], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
end
s.rate, s.mode = rate, mode

local thigh = tonumber(ARGV[9]); if thigh < 0 then thigh = 1e308 end
local test = learn('t', tonumber(ARGV[8]), thigh, tonumber(ARGV[10]))
if test then s.tpm = test * 60 end
local tpm = tonumber(s.tpm or 0)
local tpm_ceiling = tonumber(ARGV[13])
if tpm_ceiling > 0 and (tpm <= 0 or tpm > tpm_ceiling) then tpm = tpm_ceiling end
local correction = tonumber(ARGV[11])
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
"""


def _bound_args(b: Bounds | None) -> list[float]:
    if b is None:
        return [-1, -1, -1]
    return [b.low, -1 if math.isinf(b.high) else b.high, b.limit]


@dataclass
class Slot:
    """One granted request; call ``done`` exactly once with what the reply said."""

    limiter: AdaptiveLimiter
    slot_id: str
    tokens: int  # charged at acquire (the estimate, or 0 while no token budget is known)
    waited: float
    _done: bool = field(default=False, repr=False)

    def done(self, *, headers: Any = None, used_tokens: int | None = None, rate_limited: bool = False,
             failed: bool = False) -> float:
        """Release the slot and learn from the reply; returns the fleet's new base rate."""
        if self._done:
            return self.limiter.rate()
        self._done = True
        info = parse_rate_headers(headers) if headers else None
        requests, tokens = (info.requests, info.tokens) if info else (None, None)
        outcome = "limited" if rate_limited else "failed" if failed else "ok"
        correction = used_tokens - self.tokens if used_tokens is not None else 0
        lim = self.limiter
        new = lim._observe(keys=lim._observe_keys, args=[
            self.slot_id, outcome, lim.initial_rps, *_bound_args(requests),
            requests.headroom if requests is not None else -1, *_bound_args(tokens), correction,
            lim.max_in_flight or 0, lim.ceiling_tpm or 0, lim.margin, lim.ceiling_rps or 0,
            requests.remaining if requests is not None else -1])
        return float(new)


# KEYS: cooldown   ARGV: pause in ms. A fleet-wide pause (a 429's Retry-After) that only ever
# lengthens: a shorter pause asked for later never shortens the running one.
_COOLDOWN = """
local want = tonumber(ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left < want then
  redis.call('SET', KEYS[1], '1', 'PX', want)
  return want
end
return left
"""


class AdaptiveLimiter:
    """The fleet's limit for one model; see the module docstring."""

    def __init__(self, redis_client: redis.Redis, name: str, *, ceiling_rps: float | None = None,
                 burst: int = 10, ceiling_tpm: int | None = None, max_in_flight: int | None = 128,
                 lease_seconds: float = 150.0, initial_rps: float = 10.0, margin: float = 0.95) -> None:
        if ceiling_rps is not None and ceiling_rps <= 0:
            raise ValueError("ceiling_rps must be positive or None")
        if burst < 1 or initial_rps <= 0 or not 0 < margin <= 1 or lease_seconds <= 0:
            raise ValueError("burst >= 1, initial_rps > 0, 0 < margin <= 1 and lease_seconds > 0 are required")
        self.redis = redis_client
        self.name = name
        self.ceiling_rps, self.burst, self.ceiling_tpm = ceiling_rps, burst, ceiling_tpm
        self.max_in_flight, self.lease_seconds = max_in_flight, lease_seconds
        self.initial_rps, self.margin = initial_rps, margin
        self._keys = [limit_state_key(name), rate_limit_key(name), rate_limit_tokens_key(name), cooldown_key(name),
                      slots_key(name)]
        self._observe_keys = [self._keys[0], self._keys[2], self._keys[4], slots_free_key(name), self._keys[1]]
        self._acquire = redis_client.register_script(_ACQUIRE)
        self._observe = redis_client.register_script(_OBSERVE)
        self._cooldown = redis_client.register_script(_COOLDOWN)

    def try_acquire(self, tokens: int = 0) -> tuple[Slot | None, float, bool]:
        """One attempt: (slot, 0, False) if granted, else (None, seconds to wait, waiting on the cap)."""
        slot_id = uuid.uuid4().hex
        allowed, wait_us, _now, why, *charged = self._acquire(keys=self._keys, args=[
            self.initial_rps, self.ceiling_rps or 0, self.burst, self.margin, self.ceiling_tpm or 0, int(tokens),
            self.max_in_flight or 0, int(self.lease_seconds * 1e6), slot_id])
        if allowed:
            return Slot(self, slot_id, int(charged[0]), 0.0), 0.0, False
        return None, int(wait_us) / 1e6, bool(why)

    def acquire(self, tokens: int = 0, timeout: float | None = None) -> Slot:
        """Block until a request (of ``tokens`` estimated tokens) may go; raise TimeoutError past ``timeout``."""
        start = time.monotonic()
        while True:
            slot, wait, capped = self.try_acquire(tokens)
            waited = time.monotonic() - start
            if slot is not None:
                slot.waited = waited
                return slot
            if timeout is not None and waited + (0.0 if capped else wait) > timeout:
                raise TimeoutError(f"rate limiter {self.name!r}: no slot within {timeout:.3f}s "
                                   f"({'in-flight cap' if capped else f'next in {wait:.3f}s'})")
            if capped:  # a release pushes a wake-up; an expiring lease needs no push
                left = None if timeout is None else timeout - waited
                self.redis.blpop([self._observe_keys[3]], timeout=max(0.01, min(wait, 1.0, left or 1.0)))
            else:
                time.sleep(wait)

    def cooldown(self, seconds: float) -> float:
        """Pause the whole fleet for ``seconds`` unless a longer pause runs; return the pause left."""
        return int(self._cooldown(keys=[self._keys[3]], args=[max(1, int(seconds * 1000))])) / 1000.0

    def rate(self) -> float:
        """The base rate the fleet is granting now (requests/s, before margin and ceiling)."""
        raw = self.redis.hget(self._keys[0], "rate")
        return float(raw) if raw is not None else self.initial_rps

    def state(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self._keys[0]).items()}

    def in_flight(self) -> int:
        return int(self.redis.zcount(self._keys[4], time.time() * 1e6, "+inf"))
