"""This worker process's settings and Redis client, each made once and shared by every task."""

from __future__ import annotations

from functools import lru_cache

import redis

from rlmq.settings import Settings

__all__ = ["redis_client", "worker_settings"]


@lru_cache(maxsize=1)
def worker_settings() -> Settings:
    """This process's validated settings (environment + ``.env``), read once."""
    return Settings.from_env()


@lru_cache(maxsize=4)
def redis_client(url: str | None = None) -> redis.Redis:
    """A shared client (redis-py pools are thread-safe and reset themselves after fork)."""
    return redis.Redis.from_url(url or worker_settings().redis_url, health_check_interval=30)
