"""Sending a run to the fleet and taking it back: the one way the client, the job feeder, child runs,
recovery and a worker handing a run back do it."""

from __future__ import annotations

from typing import Any

from rlmq.celery_config import RLM_QUEUE, RUN_TASK
from rlmq.flower_repr import task_reprs
from rlmq.store.records import RunSpec, RunStatus, RunStore

__all__ = ["cancel_run", "send_run", "send_run_task"]


def send_run(store: RunStore, celery: Any, spec: RunSpec, described: dict[str, str], *, once: bool = False) -> None:
    """Record the run (``once``: unless it exists, as a job's run fed again) and send ``run_rlm`` for it
    (the run id is the task id). ``described``: each input's kind and size, as Flower shows them."""
    if once:
        store.create_once(spec)
    else:
        store.create(spec)
    send_run_task(celery, spec.run_id, **task_reprs(spec, described))


def send_run_task(celery: Any, run_id: str, **options: Any) -> None:
    """Send ``run_rlm`` for a recorded run: to the ``rlm`` queue, the run id as the task id (``options``:
    Celery's, e.g. the reprs Flower shows or a child's parent)."""
    celery.send_task(RUN_TASK, args=(run_id,), task_id=run_id, queue=RLM_QUEUE, **options)


def cancel_run(store: RunStore, celery: Any, run_id: str) -> None:
    """Ask a run to stop: a running one sees the flag within ~1 s; one still QUEUED is recorded CANCELLED
    at once (a revoked message never reaches ``run_rlm``; a worker that takes it anyway skips it)."""
    store.request_cancel(run_id)
    celery.control.revoke(run_id)
    # only a run still QUEUED (atomically): one a worker has just claimed sees the flag itself
    store.finish(run_id, RunStatus.CANCELLED, error="cancelled before it started", expect=RunStatus.QUEUED)
