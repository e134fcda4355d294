"""Which workers are alive, and which llm worker holds which sub-task.

Every worker's main process writes a heartbeat key (``keys.worker_heartbeat_key``, TTL
``RLMQ_WORKER_HEARTBEAT_TTL``) a few times per TTL; an llm worker also records, when a sub-task
message reaches it (Celery's ``task_received``, prefetched ones included), that it holds it
(``keys.subtask_holder_key``). A run gathering a batch asks :func:`missing_subtasks` which of its
pending sub-tasks sit on a worker without a heartbeat (or on no worker, lost from the queue), and sends
those again at once instead of
waiting for the broker's visibility timeout (an hour): ``reject_on_worker_lost`` does nothing for
the threads pool, and a SIGKILLed worker acks nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis

from rlmq.store import keys, replies
from workers.log_format import error_text
from workers.ticker import Ticker

__all__ = ["HOLDER_TTL_SECONDS", "Heartbeat", "mark_received", "missing_subtasks", "unmark"]

logger = logging.getLogger(__name__)

# A mark is deleted when its sub-task ends; the TTL only sweeps the marks of a worker that died.
# Longer than a sub-task can live (its hard limit is SUBTASK_DEADLINE + 60 s = 960 s) plus queueing.
HOLDER_TTL_SECONDS = 1800


def mark_received(client: redis.Redis, task_id: str, hostname: str) -> None:
    client.set(keys.subtask_holder_key(task_id), hostname, ex=HOLDER_TTL_SECONDS)


def unmark(client: redis.Redis, task_id: str) -> None:
    client.delete(keys.subtask_holder_key(task_id))


def missing_subtasks(client: redis.Redis, task_ids: Sequence[str], queue: str) -> tuple[list[str], list[str]]:
    """The sub-tasks among ``task_ids`` that will not be answered where they are, from one read of
    their holder marks: (lost: held by a worker whose heartbeat has expired; vanished: held by nobody
    while ``queue`` is empty, so neither waiting nor running).

    A sub-task nobody holds while the queue has messages is taken as still queued. kombu's BRPOP takes a
    message off the queue before the worker reads it, so a consumer whose connection breaks in between
    (a Redis failover breaks every connection to the old primary) loses it, and a failover loses the
    writes its replica had not received yet. A message between its pop and its ``task_received`` mark
    looks vanished for a moment: callers resend only what two checks a second apart both found."""
    if not task_ids:
        return [], []
    holders = client.mget([keys.subtask_holder_key(t) for t in task_ids])
    hosts = sorted({replies.text(h) for h in holders if h})
    alive = dict(zip(hosts, client.mget([keys.worker_heartbeat_key(h) for h in hosts]), strict=True)) if hosts else {}
    lost = [t for t, h in zip(task_ids, holders, strict=True) if h and alive.get(replies.text(h)) is None]
    unheld = [t for t, h in zip(task_ids, holders, strict=True) if not h]
    vanished = unheld if unheld and not client.llen(queue) else []
    return lost, vanished


class Heartbeat:
    """The worker's heartbeat key, written every ``ttl/4`` s by its own :class:`~workers.ticker.Ticker`.

    It is also this process's witness of Redis outages (:meth:`healthy_for`): give it a client that
    fails fast, so a beat that cannot reach Redis is noticed instead of waited out."""

    def __init__(self, client: redis.Redis, hostname: str, ttl_seconds: float) -> None:
        self.client = client
        self.hostname = hostname
        self.ttl = ttl_seconds
        self.last_failure = time.monotonic()  # of a beat (Redis away); "never" counts from the start
        self._ticker = Ticker("rlmq-heartbeat", max(0.1, ttl_seconds / 4), self._beat)

    def start(self) -> Heartbeat:
        self._beat()
        self._ticker.start()
        return self

    def stop(self) -> None:
        self._ticker.stop()
        try:
            self.client.delete(keys.worker_heartbeat_key(self.hostname))  # a clean exit is not a death
        except redis.RedisError:
            pass

    def _beat(self) -> None:
        try:
            self.client.set(keys.worker_heartbeat_key(self.hostname), repr(time.time()), px=int(self.ttl * 1000))
        except redis.RedisError as exc:  # Redis restarting: beat again next round
            self.last_failure = time.monotonic()
            logger.warning("heartbeat of %s failed: %s", self.hostname, error_text(exc))

    def healthy_for(self) -> float:
        """Seconds since this worker last failed to reach Redis."""
        return time.monotonic() - self.last_failure
