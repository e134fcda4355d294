"""A worker's warm shutdown hands its runs back instead of waiting for them to end.

An RLM run can take hours; Celery's warm shutdown would hold a rolling restart until every run on the
worker finished. Instead the worker's main process marks itself draining in Redis when it starts to
shut down (``tasks.watchdog``); each run's 1-s tick (``workers.run_ticker``, reading it in the same Lua
step that renews its claim: ``RunClaim.tick``) sees the mark, stops its
sandbox as a cancel would, and the engine puts the run back in the queue as its next attempt
(``RunClaim.hand_back``), so another worker resumes it by replay within seconds: every answered LM
call and sub-call comes from the caches. The mark is in Redis because prefork children get no signal
on a warm shutdown; it expires on its own and a worker clears its own when it starts.
"""

from __future__ import annotations

import redis

from rlmq.store import keys

__all__ = ["DRAIN_MARK_SECONDS", "clear_draining", "mark_draining"]

DRAIN_MARK_SECONDS = 3600  # longer than any warm shutdown's hand-backs take; gone if the worker never returns


def mark_draining(client: redis.Redis, hostname: str) -> None:
    client.set(keys.worker_draining_key(hostname), "1", ex=DRAIN_MARK_SECONDS)


def clear_draining(client: redis.Redis, hostname: str) -> None:
    client.delete(keys.worker_draining_key(hostname))

