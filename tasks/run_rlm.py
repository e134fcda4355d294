"""``run_rlm``: the Celery task that owns one RLM run (the engine is ``workers.run_engine``)."""

from __future__ import annotations

from typing import Any

from rlmq.celery_config import RUN_TASK
from tasks.app import app
from workers.context import setting_at_import
from workers.run_engine import RunExecution

__all__ = ["run_rlm"]

# The engine stops a run at RLMQ_RUN_TIME_LIMIT itself (its tick, in any pool: STOPPED, sandbox deleted);
# Celery's limits, which only a prefork pool enforces, are the backstop for a run whose thread is stuck.
_TIME_LIMIT: float = setting_at_import("run_time_limit")


@app.task(name=RUN_TASK, bind=True, acks_late=False, track_started=True,
          soft_time_limit=_TIME_LIMIT + 60, time_limit=_TIME_LIMIT + 180)
def run_rlm(self: Any, run_id: str) -> dict[str, Any]:
    """Execute the run whose spec is stored under ``keys.run_key(run_id)``."""
    return RunExecution(self, run_id).run()
