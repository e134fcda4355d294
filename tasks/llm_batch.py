"""``llm_batch``: the sub-task answering a chunk of a run's prompts (the work is ``workers.batch_answer``)."""

from __future__ import annotations

from typing import Any

from rlmq.celery_config import LLM_TASK
from tasks.app import app
from workers.batch_answer import answer_batch
from workers.context import setting_at_import
from workers.lm_gateway import SUBTASK_DEADLINE_SECONDS
from workers.log_format import log_context
from workers.tracing import TRACEPARENT

__all__ = ["llm_batch"]


# RLMQ_SUBTASK_EVENTS (default on): Flower then counts each llm worker's sub-tasks.
@app.task(name=LLM_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
          send_events=setting_at_import("subtask_events"),
          resultrepr_maxsize=160,  # Flower shows the start of the answers, not whole batches
          soft_time_limit=SUBTASK_DEADLINE_SECONDS + 60, time_limit=SUBTASK_DEADLINE_SECONDS + 120)
def llm_batch(self: Any, prompts: list[Any], model: str, options: dict[str, Any] | None = None,
              params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Answer ``prompts`` (strings or chat-message lists) with ``model``; one answer dict each, in order.

    ``options`` are the run's per-run settings; ``params`` are sampling parameters sent to the model.
    """
    with log_context(self.request.parent_id):  # the run (Fanout sends sub-tasks with the run as parent)
        return answer_batch(prompts, model, options, params, worker=str(self.request.hostname or ""),
                            traceparent=self.request.get(TRACEPARENT))  # the run's batch span (workers.tracing)
