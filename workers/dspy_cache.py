"""``dspy.cache`` in Redis: root-LM calls of every run are cached fleet-wide.

``install_redis_dspy_cache`` makes ``dspy.cache`` (read by every ``dspy.LM`` call) a two-tier
cache whose disk tier is Redis, so another process, or a replayed run, re-reads hits. Entries are
JSON only and nothing read from Redis is ever unpickled (``workers.cache_codec``): an entry of the
wrong shape is a miss, so a writer to Redis can at worst cost a paid call, never run code in a worker.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from dspy.clients.cache import Cache

from rlmq.store import replies
from rlmq.store.keys import dspy_cache_key
from workers import cache_codec
from workers.dspy_private import use_as_disk_tier

__all__ = ["RedisCacheTier", "RedisDspyCache", "install_redis_dspy_cache"]

logger = logging.getLogger(__name__)

def _binary_client(client: redis.Redis) -> redis.Redis:
    """The same server with decode_responses off: cache entries are bytes."""
    kwargs = client.connection_pool.connection_kwargs
    if not kwargs.get("decode_responses"):
        return client
    pool = redis.ConnectionPool(connection_class=client.connection_pool.connection_class,
                                **{**kwargs, "decode_responses": False})
    return redis.Redis(connection_pool=pool)


class RedisCacheTier:
    """The mapping dspy's Cache uses as its disk tier (get/set/delete/in), kept in Redis."""

    def __init__(self, redis_client: redis.Redis, ttl_seconds: int) -> None:
        self.redis = _binary_client(redis_client)
        self.ttl_seconds = int(ttl_seconds)

    def get(self, key: str, default: Any = None) -> Any:
        """The cached record, or ``default``: a missing entry and one that is not a well-formed
        JSON record (``cache_codec``) are both misses; the bad one is deleted."""
        raw = self.redis.get(dspy_cache_key(key))
        if raw is None:
            return default
        try:
            return cache_codec.decode(replies.raw(raw))
        except cache_codec.RejectedEntry as exc:
            cache_codec.log_once(logger, "dspy-get", "dspy cache entry %s rejected, treated as a miss: %s", key[:12], exc)
            self.redis.delete(dspy_cache_key(key))
            return default

    def set(self, key: str, value: Any) -> bool:
        try:
            raw = cache_codec.encode(value)
        except cache_codec.RejectedEntry as exc:
            cache_codec.log_once(logger, "dspy-set", "dspy cache value not stored in Redis: %s", exc)
            return False
        return bool(self.redis.set(dspy_cache_key(key), raw, ex=self.ttl_seconds))

    def delete(self, key: str) -> bool:
        return bool(self.redis.delete(dspy_cache_key(key)))

    def __contains__(self, key: str) -> bool:
        return bool(self.redis.exists(dspy_cache_key(key)))


class RedisDspyCache(Cache):
    """dspy's two-tier Cache: a per-process LRU in front of Redis instead of a local disk."""

    def __init__(
        self,
        redis_client: redis.Redis,
        ttl_seconds: int,
        *,
        memory_max_entries: int = 10_000,
    ) -> None:
        super().__init__(
            enable_disk_cache=False,  # no diskcache directory: the tier is replaced below
            enable_memory_cache=memory_max_entries > 0,
            disk_cache_dir=None,
            memory_max_entries=max(1, memory_max_entries),
        )
        use_as_disk_tier(self, RedisCacheTier(redis_client, ttl_seconds))


def install_redis_dspy_cache(
    redis_client: redis.Redis,
    ttl_seconds: int,
    *,
    memory_max_entries: int = 10_000,
) -> RedisDspyCache:
    """Assign ``dspy.cache`` to a Redis-backed cache (read by every LM call) and return it."""
    import dspy

    cache = RedisDspyCache(redis_client, ttl_seconds, memory_max_entries=memory_max_entries)
    dspy.cache = cache
    return cache
