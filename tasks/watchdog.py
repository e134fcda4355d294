"""What runs beside the tasks in every worker's main process: its heartbeat, the sub-task holder
marks of llm workers, and, in rlm workers, the periodic maintenance (reaping, run recovery) on a
thread of its own, so a slow sweep never delays a heartbeat.

Started on ``worker_ready`` and stopped on ``worker_shutdown``, so ``celery -A tasks worker`` gets
them whether it runs under ``rlmq up``, compose, or anything else; beat is optional. Their Redis
client fails fast (``workers.context``): each of them runs again a moment later.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import signals

from rlmq.celery_config import LLM_TASK, RLM_QUEUE
from tasks.app import WORKER_QUEUES, app
from workers.context import redis_client, worker_settings
from workers.drain import clear_draining, mark_draining
from workers.liveness import Heartbeat, mark_received, unmark
from workers.log_format import error_text
from workers.recovery import maintain
from workers.ticker import Ticker

__all__: list[str] = []

logger = logging.getLogger(__name__)

_state: dict[str, Any] = {}


def _client() -> Any:
    return redis_client(wait_out_outages=False)


@signals.worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    hostname = str(getattr(sender, "hostname", "") or app.conf.get("worker_hostname") or "worker")
    settings = worker_settings()
    beat = Heartbeat(_client(), hostname, settings.worker_heartbeat_ttl).start()
    _state.update(hostname=hostname, heartbeat=beat)
    if RLM_QUEUE in WORKER_QUEUES:
        try:  # a worker restarted under the same name must not hand back what it takes now
            clear_draining(_client(), hostname)
        except Exception as exc:
            logger.warning("could not clear %s's draining mark: %s", hostname, error_text(exc))
        _state["maintenance"] = Ticker("rlmq-maintenance", settings.maintenance_interval,
                                       lambda: maintain(app, redis_healthy_for=beat.healthy_for())).start()


@signals.worker_shutting_down.connect
def _drain(sig: Any = None, how: Any = None, **_: Any) -> None:
    """A warm shutdown (SIGTERM) hands this worker's runs back rather than waiting for them to end
    (``workers.drain``); a cold one (SIGQUIT) leaves them to the recovery sweep."""
    hostname = _state.get("hostname")
    if how != "Warm" or hostname is None or RLM_QUEUE not in WORKER_QUEUES:
        return

    def mark() -> None:
        try:
            mark_draining(_client(), hostname)
            logger.warning("warm shutdown: handing this worker's runs back to the queue")
        except Exception as exc:  # Redis away: the runs finish here, as Celery's warm shutdown would have it
            logger.warning("could not mark %s as draining (%s): its runs finish here", hostname, error_text(exc))

    # Celery sends this signal from inside its signal handler: no Redis I/O there (a lock the
    # interrupted code holds would deadlock it); the warm shutdown waits for the runs, so there is time.
    threading.Thread(target=mark, name="rlmq-drain", daemon=True).start()


@signals.worker_shutdown.connect
def _stop(**_: Any) -> None:
    for name in ("maintenance", "heartbeat"):
        part = _state.pop(name, None)
        if part is not None:
            part.stop()


@signals.task_received.connect
def _received(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Record which worker holds a sub-task the moment its message arrives (prefetched too)."""
    if request is None or getattr(request, "name", None) != LLM_TASK:
        return
    try:
        mark_received(_client(), request.id, _state.get("hostname") or str(getattr(sender, "hostname", "")))
    except Exception as exc:  # Redis away: the sub-task still runs; only its quick re-dispatch is lost
        logger.warning("could not mark sub-task %s as received: %s", getattr(request, "id", "?"), error_text(exc))


@signals.task_postrun.connect
def _finished(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    """The mark's job is done once the sub-task has ended (its result is stored before this)."""
    if task_id is None or getattr(sender, "name", None) != LLM_TASK:
        return
    try:
        unmark(_client(), task_id)
    except Exception:  # the TTL sweeps it up
        pass
