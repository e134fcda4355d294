"""A fleet-wide rate limiter: GCRA in one Lua script, on Redis's clock.

GCRA (the generic cell rate algorithm) keeps one number per bucket, the theoretical arrival
time (TAT). With emission interval ``T = 1 / rate`` and depth ``burst``, a request at ``now`` is
allowed iff ``max(TAT, now) + T <= now + burst * T``; if so TAT moves on by ``T``, otherwise
the caller may retry in exactly ``max(TAT, now) + T - now - burst * T``. So any window of
``w`` seconds holds at most ``burst + w * rate`` grants, fleet-wide.

The script reads the time with Redis ``TIME``, so worker clocks do not matter. Writing after
``TIME`` needs effects replication: the default since Redis 5, and the script also calls
``redis.replicate_commands()`` where it exists (it is a no-op on 7). It runs on 6.2 and 7.

An optional tokens-per-minute budget is a second GCRA bucket (one token every ``60 / tpm``
seconds, one minute deep) checked in the same script: a request passes only if both buckets
and the shared cooldown allow it. The cooldown (``cooldown(seconds)``, e.g. from a 429's
``Retry-After``) is a key whose PTTL is the pause; it only ever grows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from rlmq.keys import cooldown_key, rate_limit_key, rate_limit_tokens_key

__all__ = ["Decision", "FleetRateLimiter"]

# KEYS: requests TAT, tokens TAT, cooldown. ARGV: interval_us, burst, token_interval_us (0 = no
# token bucket), token_depth, tokens. Times are integer microseconds. Returns
# {allowed, retry_after_us, now_us}. Lua numbers are doubles: fine for microsecond timestamps
# (< 2^53), but tostring() would print them in %.14g, so they are stored with %.0f.
_GCRA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local pause = redis.call('PTTL', KEYS[3])
if pause > 0 then return {0, pause * 1000, now} end

local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now)
local new_tat = tat + interval
local wait = new_tat - now - burst * interval

local tok_interval, tok_depth, tokens = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tok_new = 0
if tok_interval > 0 and tokens > 0 then
  -- A request bigger than the whole budget passes once the bucket is full, not never.
  local cost = math.min(tokens, tok_depth)
  local tok_tat = math.max(tonumber(redis.call('GET', KEYS[2]) or 0), now)
  tok_new = tok_tat + cost * tok_interval
  wait = math.max(wait, tok_new - now - tok_depth * tok_interval)
end

if wait > 0 then return {0, math.ceil(wait), now} end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
if tok_new > 0 then
  redis.call('SET', KEYS[2], string.format('%.0f', tok_new), 'PX', math.ceil((tok_new - now) / 1000) + 1)
end
return {1, 0, now}
"""

# Set the pause to ARGV[1] ms unless a longer one is already running (no PEXPIRE GT on 6.2).
_COOLDOWN = """
local want = tonumber(ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left < want then
  redis.call('SET', KEYS[1], '1', 'PX', want)
  return want
end
return left
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float  # seconds until a retry can succeed; 0 when allowed
    server_time: float  # Redis TIME (unix seconds) at which the script decided


class FleetRateLimiter:
    """``rate_per_second`` requests (bursts of ``burst``), optionally ``tokens_per_minute``, fleet-wide."""

    def __init__(
        self,
        redis_client: redis.Redis,
        name: str,
        rate_per_second: float,
        burst: int = 1,
        tokens_per_minute: int | None = None,
    ) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if tokens_per_minute is not None and tokens_per_minute <= 0:
            raise ValueError("tokens_per_minute must be positive or None")
        self.redis = redis_client
        self.name = name
        self.rate_per_second = rate_per_second
        self.burst = burst
        self.tokens_per_minute = tokens_per_minute
        self._keys = [rate_limit_key(name), rate_limit_tokens_key(name), cooldown_key(name)]
        self._interval_us = max(1, round(1_000_000 / rate_per_second))
        self._token_interval_us = round(60_000_000 / tokens_per_minute) if tokens_per_minute else 0
        self._gcra = redis_client.register_script(_GCRA)
        self._cooldown = redis_client.register_script(_COOLDOWN)
        self.last_granted_at: float | None = None  # Redis time of this object's last grant

    def try_acquire(self, tokens: int = 0) -> Decision:
        """One attempt: take a slot now if allowed, else say how long to wait."""
        allowed, retry_us, now_us = self._gcra(
            keys=self._keys,
            args=[self._interval_us, self.burst, self._token_interval_us, self.tokens_per_minute or 0, int(tokens)],
        )
        decision = Decision(bool(allowed), int(retry_us) / 1e6, int(now_us) / 1e6)
        if decision.allowed:
            self.last_granted_at = decision.server_time
        return decision

    def acquire(self, tokens: int = 0, timeout: float | None = None) -> float:
        """Block until a request (of ``tokens`` tokens) is allowed; return the seconds waited.

        Sleeps exactly the wait the script computes. Raises TimeoutError as soon as that wait
        would end past ``timeout``: waits only grow (other grants, longer cooldowns), so
        sleeping first could not help.
        """
        start = time.monotonic()
        while True:
            decision = self.try_acquire(tokens)
            waited = time.monotonic() - start
            if decision.allowed:
                return waited
            if timeout is not None and waited + decision.retry_after > timeout:
                raise TimeoutError(
                    f"rate limiter {self.name!r}: next slot in {decision.retry_after:.3f}s, "
                    f"past the {timeout:.3f}s timeout (waited {waited:.3f}s)"
                )
            time.sleep(decision.retry_after)

    def cooldown(self, seconds: float) -> float:
        """Pause the whole fleet for ``seconds`` unless a longer pause runs; return the pause left."""
        left_ms = self._cooldown(keys=[self._keys[2]], args=[max(1, int(seconds * 1000))])
        return int(left_ms) / 1000.0

    def cooldown_remaining(self) -> float:
        left_ms = int(self.redis.pttl(self._keys[2]))
        return left_ms / 1000.0 if left_ms > 0 else 0.0
