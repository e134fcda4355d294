"""The Celery app: Redis broker and backend, two queues, JSON only, per-queue reliability.

Queues (routes are declared here, so every process that publishes routes the same way):

- ``rlm``: one ``run_rlm`` per RLM run. Early ack + prefetch 1: Redis redelivers any unacked
  message older than ``visibility_timeout`` even to a live worker, so a long ``acks_late`` run
  would execute again and again; runs are protected by their own ownership key and sandbox
  leases instead. Run with the prefork pool (time limits need it), events on.
- ``llm``: many short ``llm_batch`` sub-tasks. ``acks_late`` + ``reject_on_worker_lost``, so a
  crashed worker's batches are redelivered; safe because answers go through the response cache
  (single-flight). Run with ``-P threads -c 32``. ``llm_batch`` has ``send_events=False``: task
  events cost ~2-3 ms each and nobody watches sub-calls one by one.

A worker must consume exactly one of the two queues: a worker serving both can deadlock with
every slot in a run waiting on sub-tasks that no free slot will take. ``celeryd_init`` checks
that and the settings, and stops the worker with a one-line error.
"""

from __future__ import annotations

import logging
import sys
import time
from functools import lru_cache
from typing import Any

import redis
from celery import Celery, signals
from celery.worker.control import control_command
from kombu import Queue

from workers.settings import Settings, SettingsError, redis_url_from_env

__all__ = [
    "LLM_QUEUE", "LLM_TASK", "REAP_TASK", "RLM_QUEUE", "RUN_TASK",
    "app", "configure", "redis_client", "worker_settings",
]

logger = logging.getLogger(__name__)

RLM_QUEUE = "rlm"
LLM_QUEUE = "llm"
RUN_TASK = "rlmq.run_rlm"
LLM_TASK = "rlmq.llm_batch"
REAP_TASK = "rlmq.reap_leases"
REAP_INTERVAL_SECONDS = 60.0
# Longer than any sub-task (its own deadline is far below), so only a dead worker's
# sub-tasks come back; runs are acked early and never wait this long in a prefetch buffer.
VISIBILITY_TIMEOUT_SECONDS = 3600

_defaults = Settings()

app = Celery("rlmq")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_queues=(Queue(RLM_QUEUE), Queue(LLM_QUEUE)),
    task_default_queue=RLM_QUEUE,
    task_create_missing_queues=False,
    task_routes={RUN_TASK: {"queue": RLM_QUEUE}, LLM_TASK: {"queue": LLM_QUEUE}, REAP_TASK: {"queue": LLM_QUEUE}},
    worker_prefetch_multiplier=1,
    task_acks_late=False,  # the default; llm_batch opts in on its decorator
    worker_send_task_events=True,  # for runs; llm_batch opts out (send_events=False)
    task_send_sent_event=False,
    task_track_started=True,
    result_expires=_defaults.result_expires,
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS},
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS},
    broker_connection_retry_on_startup=True,
    worker_cancel_long_running_tasks_on_connection_loss=False,
    beat_schedule={
        "reap-expired-sandbox-leases": {"task": REAP_TASK, "schedule": REAP_INTERVAL_SECONDS,
                                         "options": {"expires": REAP_INTERVAL_SECONDS}},
    },
)


def configure(redis_url: str) -> None:
    """Point the app at ``redis_url`` (broker and backend); call before the app is first used."""
    app.conf.broker_url = redis_url
    app.conf.result_backend = redis_url


_url = redis_url_from_env()
if _url:
    configure(_url)


@lru_cache(maxsize=1)
def worker_settings() -> Settings:
    """This process's validated settings (environment + ``.env``), read once."""
    return Settings.from_env()


@lru_cache(maxsize=4)
def redis_client(url: str | None = None) -> redis.Redis:
    """A shared client (redis-py pools are thread-safe and reset themselves after fork)."""
    return redis.Redis.from_url(url or worker_settings().redis_url, health_check_interval=30)


@signals.celeryd_init.connect
def _check_worker_start(sender: Any = None, conf: Any = None, options: dict[str, Any] | None = None,
                        **_: Any) -> None:
    """Refuse to start a worker with bad settings or a queue mix that can deadlock."""
    problems: list[str] = []
    try:
        settings = worker_settings()
        if conf is not None:
            conf.broker_url = conf.result_backend = settings.redis_url
    except SettingsError as exc:
        problems.append(str(exc))
    queues = _queue_names((options or {}).get("queues"))
    if not queues:
        problems.append("pass -Q rlm (runs) or -Q llm (sub-LLM calls): a worker serving both can deadlock")
    elif {RLM_QUEUE, LLM_QUEUE} <= queues:
        problems.append("a worker must not consume both 'rlm' and 'llm' (every run slot could wait on "
                        "sub-calls no free slot takes); start one worker per queue")
    elif not queues <= {RLM_QUEUE, LLM_QUEUE}:
        problems.append(f"unknown queue(s) {sorted(queues - {RLM_QUEUE, LLM_QUEUE})}; use rlm or llm")
    if problems:
        print("rlmq worker: " + " | ".join(problems), file=sys.stderr, flush=True)
        raise SystemExit(2)
    if LLM_QUEUE in queues:  # pay LiteLLM's ~6 s import and pool setup now, not in the first sub-task
        from workers.llm_call import preload

        preload()


def _queue_names(raw: Any) -> set[str]:
    if not raw:
        return set()
    items = raw.split(",") if isinstance(raw, str) else [q for part in raw for q in str(part).split(",")]
    return {q.strip() for q in items if q.strip()}


@app.task(name=REAP_TASK, ignore_result=True, send_events=False)
def reap_leases() -> int:
    """Beat's maintenance: reap expired leases here, then ask every worker to reap its host's."""
    reaped = _reap_here()
    app.control.broadcast("rlmq_reap_local")
    return reaped


@control_command()
def rlmq_reap_local(state: Any) -> dict[str, int]:
    """Remote control: reap expired leases of local sandboxes that live on this worker's host."""
    return {"ok": _reap_here()}


def _reap_here() -> int:
    """Destroy sandboxes with expired leases that this host may reap; a run left RUNNING by a
    dead worker (its claim expired too) is recorded as FAILED, so it does not hang forever."""
    from tasks.records import RunStore
    from workers.sandbox_registry import reap_expired

    client = redis_client()
    reaped = reap_expired(client, time.time())
    store = RunStore(client)
    for lease in reaped:
        if store.fail_if_orphaned(lease.run_id, f"worker lost: {lease.owner} stopped renewing the run's sandbox lease"):
            logger.warning("run %s marked FAILED: its worker %s is gone", lease.run_id, lease.owner)
    return len(reaped)
