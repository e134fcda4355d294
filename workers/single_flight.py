"""The fleet-wide response cache of sub-LM calls in Redis, with single flight.

``ResponseCache`` caches sub-LM responses (JSON dicts) by a hash of model, messages and sampling
parameters, with ``single_flight``: when many workers ask the same uncached prompt at once,
one computes (one paid call) and the rest wait to be woken, not polling.

Single flight, per cache key (names from ``rlmq.store.keys``):

* the leader holds ``inflight`` (``SET NX PX lease``, value = a random flight token; a thread
  of the leader's process renews it every ``lease/3`` for at most ``lock_ttl``, so a dead leader's
  lock is gone within ``FLIGHT_LEASE_SECONDS``, not after the longest possible compute) and, on
  taking it, clears ``done``; when finished it stores the value (if cacheable), releases the
  lock (only if still its own) and pushes one wake-up ``{"flight": token, ...}`` onto ``done``,
  all in one script (one round trip);
* a waiter blocks in ``BLPOP done`` for at most the lock's remaining TTL. A wake-up of the
  flight it waits for is pushed back (so the next waiter wakes too: one list element wakes
  everybody in turn) and then the waiter re-reads the cache. A wake-up of an older flight is
  dropped. If the BLPOP times out, the leader died or overran ``lock_ttl``: the lock has
  expired, and the waiter takes over. Values that must not be cached (errors) are handed to
  the current waiters inside the wake-up, so one failing prompt is still only paid once per
  flight; an exception in ``compute`` hands over nothing and a waiter computes again.

The cache holds JSON only and nothing read from it is ever unpickled: a writer to Redis can at
worst cost a paid call, never run code in a worker. (``workers.dspy_cache`` is the root LM's cache.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from rlmq.store import replies
from rlmq.store.keys import inflight_done_key, inflight_key, response_cache_key
from rlmq.store.lua import lua_scripts
from workers import cache_codec

__all__ = ["FLIGHT_LEASE_SECONDS", "ResponseCache"]

logger = logging.getLogger(__name__)

# Client settings that do not change an answer, so they stay out of the cache key.
_NON_SAMPLING_PARAMS = frozenset({
    "api_key", "api_base", "base_url", "api_version", "organization", "project", "timeout",
    "num_retries", "headers", "extra_headers", "cache", "metadata", "stream",
})
_DONE_TTL_MS = 10_000  # a wake-up is consumed at once; the TTL only sweeps leftovers
FLIGHT_LEASE_SECONDS = 10.0  # a single-flight lock outlives its leader's process by at most this

_LUA = lua_scripts("workers")  # workers/lua/flight_*.lua


class ResponseCache:
    """JSON dicts in Redis with a TTL, plus fleet-wide single-flight computation."""

    def __init__(self, redis_client: redis.Redis, ttl_seconds: int,
                 valid: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """``valid(value)``: the shape a hit must have (default: any JSON object); others are misses."""
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self.redis = redis_client
        self.ttl_seconds = int(ttl_seconds)
        self.valid = valid or (lambda value: True)

    @staticmethod
    def key_for(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        """sha256 of the canonical JSON of model, messages and the parameters that shape the answer."""
        sampling = {k: v for k, v in params.items() if k not in _NON_SAMPLING_PARAMS}
        canonical = json.dumps(
            {"model": model, "messages": messages, "params": sampling},
            sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=repr,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        return self._decode_entry(key, self.redis.get(response_cache_key(key)))

    def get_many(self, keys: list[str]) -> list[dict[str, Any] | None]:
        """One MGET for a whole batch: a sub-task checks all its prompts in one round trip."""
        if not keys:
            return []
        raws = self.redis.mget([response_cache_key(k) for k in keys])
        return [self._decode_entry(k, raw) for k, raw in zip(keys, raws, strict=True)]

    def _decode_entry(self, key: str, raw: bytes | str | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            value = json.loads(raw)
            if isinstance(value, dict) and self.valid(value):
                return value
            problem = "not an answer record"
        except (ValueError, UnicodeDecodeError) as exc:
            problem = f"not JSON: {exc}"
        cache_codec.log_once(logger, "response-get", "response cache entry %s rejected, treated as a miss: %s", key[:12], problem)
        self.redis.delete(response_cache_key(key))
        return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.redis.set(response_cache_key(key), json.dumps(value, allow_nan=False), ex=self.ttl_seconds)

    def single_flight(
        self,
        key: str,
        compute: Callable[[], dict[str, Any]],
        *,
        lock_ttl: float,
        wait_timeout: float,
        cacheable: Callable[[dict[str, Any]], bool] | None = None,
        known_miss: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """Return ``(value, was_cached)``; at most one caller fleet-wide runs ``compute`` per flight.

        ``was_cached`` is False only for the caller that ran ``compute``. ``cacheable(value)``
        (default: always) decides whether the value is stored. ``lock_ttl`` must exceed the
        longest compute (a slower leader gets a second, concurrent compute); the Redis client's
        ``socket_timeout`` must exceed ``FLIGHT_LEASE_SECONDS`` (waiters block in BLPOP up to a
        lock's lease; redis-py 8 defaults to 5 s, ``workers.context`` sets more).
        Raises TimeoutError after ``wait_timeout`` seconds of waiting for other callers.
        ``known_miss``: the caller has just looked (``get_many``), so the first look is skipped.
        """
        lock, done = inflight_key(key), inflight_done_key(key)
        lock_ms = max(1, int(min(lock_ttl, FLIGHT_LEASE_SECONDS) * 1000))
        deadline = time.monotonic() + wait_timeout
        while True:
            hit = None if known_miss else self.get(key)
            known_miss = False
            if hit is not None:
                return hit, True
            token = uuid.uuid4().hex
            acquired, holder, pttl = _LUA.run(self.redis, "flight_acquire", [lock, done, response_cache_key(key)],
                                              {"token": token, "lease_ms": lock_ms})
            if acquired == 2:  # a flight ended since the look-up: its answer, not a second paid call
                hit = self._decode_entry(key, holder)
                if hit is not None:
                    return hit, True
                continue
            if acquired:
                with _renewer.holding(self.redis, lock, token, lock_ms, until=time.monotonic() + lock_ttl):
                    return self._lead(key, token, compute, cacheable), False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"single_flight({key[:12]}…): still computing elsewhere after {wait_timeout:.1f}s")
            # Wake at the latest when the lock expires: then its holder is presumed dead.
            lock_left = (pttl if pttl > 0 else lock_ms) / 1000.0
            popped = self.redis.blpop([done], timeout=max(0.01, min(remaining, lock_left + 0.02)))
            if popped is None:
                continue
            payload = popped[1]
            try:
                message = json.loads(payload)
            except ValueError:
                continue  # not ours to read: drop it, re-check
            if not isinstance(message, dict) or message.get("flight") != replies.text(holder):
                continue  # left over from an earlier flight: drop it, re-check
            self.redis.rpush(done, payload)  # pass the wake-up on to the next waiter
            handed = message.get("value")
            if isinstance(handed, dict) and self.valid(handed):
                return handed, True

    def _lead(
        self,
        key: str,
        token: str,
        compute: Callable[[], dict[str, Any]],
        cacheable: Callable[[dict[str, Any]], bool] | None,
    ) -> dict[str, Any]:
        wake: dict[str, Any] = {"flight": token, "failed": True}
        stored: tuple[str, ...] = ()
        try:
            value = compute()
            if cacheable is None or cacheable(value):
                stored = (json.dumps(value, allow_nan=False),)  # written by the release below
                wake = {"flight": token, "value": None}  # waiters read the cache
            else:
                wake = {"flight": token, "value": value}  # not cached: hand it over directly
            return value
        finally:
            _LUA.run(self.redis, "flight_release", [inflight_key(key), inflight_done_key(key), response_cache_key(key)],
                     {"token": token, "done_ttl_ms": _DONE_TTL_MS, "ttl_s": self.ttl_seconds}, json.dumps(wake), *stored)


class _LockRenewer:
    """One daemon thread per process renewing the single-flight locks its leaders hold."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, str, str], tuple[redis.Redis, int, float]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def holding(self, client: redis.Redis, lock: str, token: str, lease_ms: int, *, until: float) -> _Held:
        return _Held(self, (id(client), lock, token), (client, lease_ms, until))

    def _add(self, item: tuple[int, str, str], value: tuple[redis.Redis, int, float]) -> None:
        with self._lock:
            self._held[item] = value
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="rlmq-flight-renewer", daemon=True)
                self._thread.start()

    def _remove(self, item: tuple[int, str, str]) -> None:
        with self._lock:
            self._held.pop(item, None)

    def _loop(self) -> None:
        while True:
            time.sleep(FLIGHT_LEASE_SECONDS / 3)
            with self._lock:
                held = list(self._held.items())
            now = time.monotonic()
            for (_, lock, token), (client, lease_ms, until) in held:
                if now > until:
                    continue  # past lock_ttl: a slower leader gets company (documented above)
                try:
                    _LUA.run(client, "flight_renew", [lock], {"token": token, "lease_ms": lease_ms})
                except Exception:  # Redis away: the lock may lapse, a waiter then computes too
                    pass


class _Held:
    def __init__(self, renewer: _LockRenewer, item: tuple[int, str, str], value: tuple[redis.Redis, int, float]) -> None:
        self.renewer, self.item, self.value = renewer, item, value

    def __enter__(self) -> None:
        self.renewer._add(self.item, self.value)

    def __exit__(self, *_: object) -> None:
        self.renewer._remove(self.item)


_renewer = _LockRenewer()
