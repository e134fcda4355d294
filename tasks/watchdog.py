"""What runs beside the tasks in every worker's main process: its heartbeat, the sub-task holder
marks of llm workers, and, in rlm workers, the periodic maintenance (reaping, run recovery).

Started on ``worker_ready`` and stopped on ``worker_shutdown``, so ``celery -A tasks worker`` gets
them whether it runs under ``rlmq up``, compose, or anything else; beat is optional.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from rlmq.celery_config import LLM_TASK, RLM_QUEUE
from tasks.app import WORKER_QUEUES, app
from workers.context import redis_client, worker_settings
from workers.liveness import Heartbeat, mark_received, unmark
from workers.recovery import maintain

__all__: list[str] = []

logger = logging.getLogger(__name__)

_state: dict[str, Any] = {}


@signals.worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    hostname = str(getattr(sender, "hostname", "") or app.conf.get("worker_hostname") or "worker")
    settings = worker_settings()
    beat = Heartbeat(redis_client(), hostname, settings.worker_heartbeat_ttl)
    if RLM_QUEUE in WORKER_QUEUES:
        beat.every(settings.maintenance_interval, lambda: maintain(app, redis_healthy_for=beat.healthy_for()))
    _state.update(hostname=hostname, heartbeat=beat.start())


@signals.worker_shutdown.connect
def _stop(**_: Any) -> None:
    beat = _state.pop("heartbeat", None)
    if beat is not None:
        beat.stop()


@signals.task_received.connect
def _received(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Record which worker holds a sub-task the moment its message arrives (prefetched too)."""
    if request is None or getattr(request, "name", None) != LLM_TASK:
        return
    try:
        mark_received(redis_client(), request.id, _state.get("hostname") or str(getattr(sender, "hostname", "")))
    except Exception as exc:  # Redis away: the sub-task still runs; only its quick re-dispatch is lost
        logger.warning("could not mark sub-task %s as received: %r", getattr(request, "id", "?"), exc)


@signals.task_postrun.connect
def _finished(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    """The mark's job is done once the sub-task has ended (its result is stored before this)."""
    if task_id is None or getattr(sender, "name", None) != LLM_TASK:
        return
    try:
        unmark(redis_client(), task_id)
    except Exception:  # the TTL sweeps it up
        pass
