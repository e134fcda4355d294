"""This worker process's settings and Redis clients, each made once and shared by every task.

Redis outages are the client's job (redis-py's ``Retry``): a command that meets a connection error
or a timeout is sent again with exponential backoff for about two minutes (``OUTAGE_RETRY``), so a
Redis restart or failover turns into latency, not into failed runs or ``[ERROR]`` answers. That is
safe because what the workers write is idempotent or harmless to repeat when a reply was lost:

- a run's claim, renewal, progress and final write are Lua scripts that answer a repeated call as
  the first (``workers.claim``, ``RunStore.finish``);
- a trajectory step (RPUSH), the fleet counters (INCRBY), a limiter grant or observation and a
  single-flight wake-up may be applied twice: a step shown twice in a trace, a counter one batch
  high, a slot charged twice until its lease expires, one more wake-up, which waiters tolerate.

The main process's own loops (heartbeat, maintenance sweep, sub-task marks) use the client that
fails fast (``wait_out_outages=False``): each of them runs again a moment later anyway, and the sweep
must not resume inside the grace after an outage (``workers.recovery``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from rlmq.redis_retry import OutageRetry
from rlmq.redis_url import connect
from rlmq.settings import Settings, SettingsError

__all__ = ["MAX_CONNECTIONS", "OUTAGE_RETRY", "SOCKET_TIMEOUT", "redis_client", "setting_at_import", "worker_settings"]

# 0.2 + 0.4 + 0.8 + 1.6 s, then every 2 s: about 115 s in all before the error reaches the caller.
OUTAGE_RETRY = OutageRetry(ExponentialBackoff(cap=2.0, base=0.1), retries=60)
_OUTAGE_ERRORS = [redis.ConnectionError, redis.TimeoutError]
# Longer than any blocking wait sent on these clients (a single-flight waiter's BLPOP lasts up to the
# lock's lease, 10 s): redis-py 8's default of 5 s would turn that wait into a TimeoutError, retried.
SOCKET_TIMEOUT = 15.0
# A threads-pool rlm worker holds hundreds of runs, each with a tick, lease renewals and blocking waits
# (limiter slots, single-flight) on this one shared client: redis-py 8's default pool of 100 connections
# ran out at 200 runs ("Too many connections", not retried: runs failed and claims lapsed). The bound
# that matters is Redis's own `maxclients` (10,000 by default); a connection is made only when needed.
MAX_CONNECTIONS = 10_000


@lru_cache(maxsize=1)
def worker_settings() -> Settings:
    """This process's validated settings (environment + ``.env``), read once."""
    return Settings.from_env()


def setting_at_import(name: str) -> Any:
    """A setting a task module needs while it is imported: the worker's when its settings are valid,
    else the default (a worker with bad settings stops at start with the reason: ``tasks.app``)."""
    try:
        return getattr(worker_settings(), name)
    except SettingsError:
        return getattr(Settings(), name)


@lru_cache(maxsize=8)
def redis_client(url: str | None = None, *, wait_out_outages: bool = True) -> redis.Redis:
    """A shared client (redis-py pools are thread-safe and reset themselves after fork)."""
    retry = OUTAGE_RETRY if wait_out_outages else Retry(NoBackoff(), retries=0)
    return connect(url or worker_settings().redis_url, health_check_interval=30, retry=retry,
                   retry_on_error=_OUTAGE_ERRORS, socket_timeout=SOCKET_TIMEOUT, max_connections=MAX_CONNECTIONS)
