"""What monitors see of a running run: Celery's state, Flower's task page, fleet counters.

- Celery state ``STARTED`` with the progress (``rlmq.store.records.Progress``) as meta
  (``AsyncResult(run_id).info``): a custom state such as ``PROGRESS`` hides running runs from
  Flower's "Started" filter, which matches the state name exactly.
- A ``task-started`` event per update, whose ``result`` field is a one-line summary
  (iteration, the batch in flight, sub-calls, cache hits, dollars): Flower merges the event
  into the task it shows, and its task page and API (``/api/task/info/<id>``) show ``result``
  but not custom fields. The flat progress numbers ride along for other event consumers.
- Fleet counters per second in Redis (``keys.stats_key``): sub-calls, cache hits and 429s,
  for ``rlmq stats``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import redis

from rlmq.store.keys import stats_key
from rlmq.store.records import Progress

__all__ = ["COUNTER_TTL_SECONDS", "count", "publish_progress", "summary_line"]

logger = logging.getLogger(__name__)

COUNTER_TTL_SECONDS = 300


def summary_line(progress: Progress) -> str:
    """``iteration 3/20 · batch 120/500 (40 cached) · sub-calls 620 · cache hits 240 · $0.0123 paid ...``."""
    parts = []
    if progress.max_iters:
        parts.append(f"iteration {progress.iteration}/{progress.max_iters}")
    batch = progress.batch
    if batch:
        parts.append(f"batch {batch.done}/{batch.total} ({batch.cache_hits} cached)")
    parts.append(f"sub-calls {progress.llm_calls}")
    parts.append(f"cache hits {progress.cache_hits}")
    total = progress.usage.total
    parts.append(f"${total.cost_paid:.4f} paid (${total.cost_uncached:.4f} uncached)")
    return " · ".join(parts)


def publish_progress(task: Any, run_id: str, hostname: str, progress: Progress, *, started_at: float) -> None:
    """Celery state STARTED + progress as meta, and a task-started event Flower shows; may raise (caller logs).

    ``started_at`` (unix seconds) rides in the event: Flower sets a task's ``started`` to the
    time of every task-started event, and the run's start must stay its start.
    """
    task.update_state(task_id=run_id, state="STARTED", meta=progress.to_json_dict())
    with task.app.events.default_dispatcher(hostname=hostname) as dispatcher:
        dispatcher.send("task-started", uuid=run_id, started=started_at, result=summary_line(progress),
                        **_event_fields(progress))


def _event_fields(progress: Progress) -> dict[str, Any]:
    # Flat fields only: Flower's API and search show them; the nested usage stays in the backend.
    out: dict[str, Any] = {"iteration": progress.iteration, "max_iters": progress.max_iters,
                           "llm_calls": progress.llm_calls, "cache_hits": progress.cache_hits,
                           "llm_errors": progress.llm_errors, "elapsed": round(progress.elapsed, 3),
                           "cost_usd": round(progress.cost_usd, 8)}
    if progress.batch:
        out["batch_done"], out["batch_total"] = progress.batch.done, progress.batch.total
    return out


def count(client: redis.Redis, counts: Iterable[tuple[str, int]], now: float | None = None) -> None:
    """Add to this second's fleet counters (one pipeline); never raises."""
    second = int(time.time() if now is None else now)
    try:
        pipe = client.pipeline(transaction=False)
        for name, n in counts:
            if n:
                key = stats_key(name, second)
                pipe.incrby(key, int(n))
                pipe.expire(key, COUNTER_TTL_SECONDS)
        pipe.execute()
    except redis.RedisError:
        logger.debug("fleet counters not updated", exc_info=True)
