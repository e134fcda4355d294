"""Sending a run to the fleet and taking it back: the one way the client and the job feeder do both."""

from __future__ import annotations

from typing import Any

from rlmq.celery_config import RLM_QUEUE, RUN_TASK
from rlmq.flower_repr import task_reprs
from rlmq.store.records import RunSpec, RunStatus, RunStore

__all__ = ["cancel_run", "send_run"]


def send_run(store: RunStore, celery: Any, spec: RunSpec, described: dict[str, str], *, once: bool = False) -> None:
    """Record the run (``once``: unless it exists, as a job's run fed again) and send ``run_rlm`` for it
    (the run id is the task id). ``described``: each input's kind and size, as Flower shows them."""
    if once:
        store.create_once(spec)
    else:
        store.create(spec)
    celery.send_task(RUN_TASK, args=(spec.run_id,), task_id=spec.run_id, queue=RLM_QUEUE,
                     **task_reprs(spec, described))


def cancel_run(store: RunStore, celery: Any, run_id: str) -> None:
    """Ask a run to stop: a running one sees the flag within ~1 s; one still QUEUED is recorded CANCELLED
    at once (a revoked message never reaches ``run_rlm``; a worker that takes it anyway skips it)."""
    store.request_cancel(run_id)
    celery.control.revoke(run_id)
    # only a run still QUEUED (atomically): one a worker has just claimed sees the flag itself
    store.finish(run_id, RunStatus.CANCELLED, error="cancelled before it started", expect=RunStatus.QUEUED)
