"""What monitors see of a running run: Celery's state, Flower's task page, fleet counters.

- Celery state ``STARTED`` with the progress dict as meta (``AsyncResult(run_id).info``): a
  custom state such as ``PROGRESS`` hides running runs from Flower's "Started" filter, which
  matches the state name exactly.
- A ``task-started`` event per update, whose ``result`` field is a one-line summary
  (iteration, the batch in flight, sub-calls, cache hits, dollars): Flower merges the event
  into the task it shows, and its task page and API (``/api/task/info/<id>``) show ``result``
  but not custom fields. The flat progress fields ride along for other event consumers.
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

__all__ = ["COUNTER_TTL_SECONDS", "count", "one_line", "publish_progress", "summary_line"]

logger = logging.getLogger(__name__)

COUNTER_TTL_SECONDS = 300


def summary_line(meta: dict[str, Any]) -> str:
    """``iteration 3/20 · batch 120/500 (40 cached) · sub-calls 620 · cache hits 240 · $0.0123 paid``."""
    parts = []
    if meta.get("iteration") is not None:
        parts.append(f"iteration {meta.get('iteration')}/{meta.get('max_iters', '?')}")
    batch = meta.get("batch")
    if batch:
        parts.append(f"batch {batch['done']}/{batch['total']} ({batch['cache_hits']} cached)")
    parts.append(f"sub-calls {meta.get('llm_calls', 0)}")
    parts.append(f"cache hits {meta.get('cache_hits', 0)}")
    total = (meta.get("usage") or {}).get("total") or {}
    if total:
        parts.append(f"${total.get('cost_paid', 0):.4f} paid (${total.get('cost_uncached', 0):.4f} uncached)")
    return " · ".join(parts)


def publish_progress(task: Any, run_id: str, hostname: str, meta: dict[str, Any], *, started_at: float) -> None:
    """Celery state STARTED + meta, and a task-started event Flower shows; may raise (caller logs).

    ``started_at`` (unix seconds) rides in the event: Flower sets a task's ``started`` to the
    time of every task-started event, and the run's start must stay its start.
    """
    task.update_state(task_id=run_id, state="STARTED", meta=meta)
    with task.app.events.default_dispatcher(hostname=hostname) as dispatcher:
        dispatcher.send("task-started", uuid=run_id, started=started_at, result=summary_line(meta),
                        **_event_fields(meta))


def _event_fields(meta: dict[str, Any]) -> dict[str, Any]:
    # Flat fields only: Flower's API and search show them; the nested usage stays in the backend.
    keep = ("iteration", "max_iters", "llm_calls", "cache_hits", "llm_errors", "elapsed", "cost_usd")
    out = {k: meta[k] for k in keep if k in meta}
    if meta.get("batch"):
        out["batch_done"], out["batch_total"] = meta["batch"]["done"], meta["batch"]["total"]
    return out


def one_line(text: str, limit: int = 2000) -> str:
    """An error as one line: Flower shows an exception's repr, where a newline is a literal ``\\n``."""
    flat = " | ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


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
