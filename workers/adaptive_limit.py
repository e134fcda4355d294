"""A fleet-wide limiter that learns each provider's limit: GCRA at a learned rate, a TPM bucket
charged with actual usage, a cap on in-flight requests with leases, and the shared cooldown.

State lives in Redis (``rlmq.store.keys``: ``limit``, ``rate``, ``tpm``, ``slots``, ``cooldown``), so
every worker process of the fleet obeys one limit per model. Lua scripts on Redis's clock
(``workers/lua/limit_*.lua``):

- ``acquire``: wait out a cooldown; refuse while ``max_in_flight`` leases are live (expired
  leases, a dead worker's, are dropped first); then GCRA at the learned rate (times ``margin``,
  capped by the optional ceiling; a burst may spend half of what the provider last said
  remains, up to a second's worth; before the first headers or 429, nothing but the ceiling) and,
  when a token budget is known, the TPM bucket charged with the request's estimate. A turn within
  ``RESERVE_SECONDS`` is granted at once, to start then (``acquire`` sleeps until it), so waiters
  do not all ask again at each interval. A grant adds a lease (expiring after ``lease_seconds``).
- ``observe``: release the lease, wake one waiter, and learn from the reply. With rate-limit
  headers (``workers.rate_headers``) the limit is the geometric mean of the tightest bounds seen
  so far (an upper bound alone, from a near-full bucket, is used as is: the bucket absorbs the
  overshoot until lower bounds arrive); bounds widen slowly (~10 min), so a raised limit is
  found again. Without them nothing throttles (only the in-flight cap) until the first 429.
  A 429 comes back at once, a success only after the model's latency, so at that moment the
  burst's successes are still on their way: the limiter paces at a provisional rate ("settle")
  until every request leased before the 429 has replied (at least a second), then starts AIMD at
  0.9x the best second of successes seen; then +0.03 request/s per success (3 %/s), x0.7 on
  later 429s (once per second, however many arrive together). Increases only happen while callers are actually waiting on the limiter. The token bucket is corrected by
  ``actual - estimate`` tokens.
- ``cooldown``: a 429's ``Retry-After`` pauses the whole fleet.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from rlmq.store import replies
from rlmq.store.keys import (
    cooldown_key,
    limit_state_key,
    rate_limit_key,
    rate_limit_tokens_key,
    slots_free_key,
    slots_key,
)
from rlmq.store.lua import lua_scripts
from workers.rate_headers import Bounds, parse_rate_headers

__all__ = ["AdaptiveLimiter", "Slot"]

RESERVE_SECONDS = 1.0  # how far ahead a waiting caller's turn is granted (its start then slept out)

_LUA = lua_scripts("workers")  # workers/lua/limit_*.lua: acquire, observe, cooldown


def _bounds(b: Bounds | None) -> dict[str, float] | None:
    if b is None:
        return None
    return {"low": b.low, "limit": b.limit, **({} if math.isinf(b.high) else {"high": b.high})}


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
        named: dict[str, Any] = {
            "slot": self.slot_id, "outcome": outcome, "initial_rps": lim.initial_rps, "margin": lim.margin,
            "ceiling_rps": lim.ceiling_rps or 0, "ceiling_tpm": lim.ceiling_tpm or 0, "cap": lim.max_in_flight or 0,
            "lease_us": int(lim.lease_seconds * 1e6), "correction": correction}
        if requests is not None:
            named.update(requests=_bounds(requests), headroom=requests.headroom, remaining=requests.remaining)
        if tokens is not None:
            named["tokens"] = _bounds(tokens)
        new = _LUA.run(lim.redis, "limit_observe", lim._observe_keys, named)
        return float(new)


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

    def try_acquire(self, tokens: int = 0, reserve: float = 0.0) -> tuple[Slot | None, float, bool]:
        """One attempt: (slot, seconds until it may start, False) if granted, else (None, seconds to wait,
        waiting on the cap). A turn at most ``reserve`` seconds away is granted, to start then."""
        slot_id = uuid.uuid4().hex
        allowed, wait_us, _now, why, *charged = _LUA.run(self.redis, "limit_acquire", self._keys, {
            "initial_rps": self.initial_rps, "ceiling_rps": self.ceiling_rps or 0, "burst": self.burst,
            "margin": self.margin, "ceiling_tpm": self.ceiling_tpm or 0, "tokens": int(tokens),
            "cap": self.max_in_flight or 0, "lease_us": int(self.lease_seconds * 1e6), "slot": slot_id,
            "reserve_us": int(max(0.0, reserve) * 1e6)})
        if allowed:
            return Slot(self, slot_id, int(charged[0]), 0.0), int(wait_us) / 1e6, False
        return None, int(wait_us) / 1e6, bool(why)

    def acquire(self, tokens: int = 0, timeout: float | None = None) -> Slot:
        """Block until a request (of ``tokens`` estimated tokens) may go; raise TimeoutError past ``timeout``.

        A turn within ``RESERVE_SECONDS`` is reserved and slept out here; a caller further back sleeps
        until its turn comes within reach (plus jitter, so the waiters do not all ask at once)."""
        start = time.monotonic()
        while True:
            left = None if timeout is None else timeout - (time.monotonic() - start)
            reach = RESERVE_SECONDS if left is None else max(0.0, min(RESERVE_SECONDS, left))
            slot, wait, capped = self.try_acquire(tokens, reserve=reach)
            if slot is not None:
                if wait > 0:
                    time.sleep(wait)
                slot.waited = time.monotonic() - start
                return slot
            waited = time.monotonic() - start
            if timeout is not None and waited + (0.0 if capped else wait) > timeout:
                raise TimeoutError(f"rate limiter {self.name!r}: no slot within {timeout:.3f}s "
                                   f"({'in-flight cap' if capped else f'next in {wait:.3f}s'})")
            if not capped and wait > reach:  # not even within reach: come back as it gets there
                wait = max(0.001, wait - reach) + random.uniform(0.0, reach / 2)
            if capped:  # a release pushes a wake-up; an expiring lease needs no push
                left = None if timeout is None else timeout - waited
                self.redis.blpop([self._observe_keys[3]], timeout=max(0.01, min(wait, 1.0, left or 1.0)))
            else:
                time.sleep(wait)

    def cooldown(self, seconds: float) -> float:
        """Pause the whole fleet for ``seconds`` unless a longer pause runs; return the pause left."""
        return int(_LUA.run(self.redis, "limit_cooldown", [self._keys[3]],
                            {"pause_ms": max(1, int(seconds * 1000))})) / 1000.0

    def rate(self) -> float:
        """The base rate the fleet is granting now (requests/s, before margin and ceiling)."""
        raw = self.redis.hget(self._keys[0], "rate")
        return float(raw) if raw is not None else self.initial_rps

    def state(self) -> dict[str, str]:
        return {replies.text(k): replies.text(v) for k, v in self.redis.hgetall(self._keys[0]).items()}

    def in_flight(self) -> int:
        return int(self.redis.zcount(self._keys[4], time.time() * 1e6, "+inf"))
