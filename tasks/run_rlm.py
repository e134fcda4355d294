"""``run_rlm``: the Celery task that owns one RLM run (the engine is ``workers.run_engine``)."""

from __future__ import annotations

from typing import Any

from rlmq.celery_config import RUN_TASK
from rlmq.settings import Settings, SettingsError
from tasks.app import app
from workers.context import worker_settings
from workers.run_engine import RunExecution

__all__ = ["run_rlm"]


def _run_time_limit() -> float:
    """The worker's RLMQ_RUN_TIME_LIMIT when its settings are valid (a bad setting stops the
    worker at start anyway), else the default."""
    try:
        return worker_settings().run_time_limit
    except SettingsError:
        return Settings().run_time_limit


_TIME_LIMIT = _run_time_limit()


@app.task(name=RUN_TASK, bind=True, acks_late=False, track_started=True,
          soft_time_limit=_TIME_LIMIT, time_limit=_TIME_LIMIT + 120)
def run_rlm(self: Any, run_id: str) -> dict[str, Any]:
    """Execute the run whose spec is stored under ``keys.run_key(run_id)``."""
    return RunExecution(self, run_id).run()
