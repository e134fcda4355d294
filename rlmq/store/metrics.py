"""The fleet's Prometheus counters, kept in Redis: their names, labels and the one way to add to them.

Each counter is a hash ``keys.metric_key(name)`` whose fields are label sets (a JSON list of the
label values, in ``LABELS[name]``'s order) and whose values only grow, so ``rlmq exporter`` can
serve the whole fleet from Redis with no per-worker scrape. Writers add where the event happens:

- ``rlmq_runs_total{status}`` and the ``rlmq_run_duration_seconds`` histogram: in the same Lua
  script that records a run's end (``run_finish.lua``), so a run is counted once, by the write
  that ended it;
- ``rlmq_subcalls_total``, ``rlmq_lm_tokens_total``, ``rlmq_cost_dollars_total``: by the run worker
  as it accounts its calls (``workers.usage.RunUsage``: each finished batch, each root-LM call), so
  the totals are the runs' own usage (a sub-task sent again after its worker died is counted once);
- ``rlmq_throttled_total{model}``: by the LM gateway at each 429.

Gauges (runs active, learned rates, in-flight, sandboxes, queues) are read at scrape time from the
state the fleet keeps anyway.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import redis

from rlmq.store.keys import metric_key

if TYPE_CHECKING:
    from rlmq.store.records import CallUsage  # which imports this module (the run's end counts the run)

__all__ = ["COST", "DURATION_BUCKETS", "LABELS", "RUNS", "RUN_DURATION", "SUBCALLS", "THROTTLED", "TOKENS",
           "add_usage", "count_throttled", "label_field", "label_values"]

logger = logging.getLogger(__name__)

RUNS = "rlmq_runs_total"
RUN_DURATION = "rlmq_run_duration_seconds"  # fields: each bucket's upper bound (not cumulative), "sum", "count"
SUBCALLS = "rlmq_subcalls_total"
TOKENS = "rlmq_lm_tokens_total"
COST = "rlmq_cost_dollars_total"
THROTTLED = "rlmq_throttled_total"

LABELS: dict[str, tuple[str, ...]] = {
    RUNS: ("status",),
    SUBCALLS: ("model", "cached"),
    TOKENS: ("model", "direction"),
    COST: ("model", "kind"),
    THROTTLED: ("model",),
}

# A run takes seconds to hours: upper bounds in seconds (the last bucket, +Inf, is the count).
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


def label_field(*values: str) -> str:
    return json.dumps(list(values))


def label_values(field: str | bytes) -> list[str]:
    values = json.loads(field)
    return [str(v) for v in values] if isinstance(values, list) else []


def add_usage(client: redis.Redis, usage: CallUsage, *, subcalls: bool) -> None:
    """Add calls just accounted (a ``CallUsage`` delta) to the fleet's totals; never raises.

    Tokens are the ones the provider processed (paid); ``cost`` has two kinds: ``paid`` (billed)
    and ``uncached`` (what the same calls would have cost without the cache).
    """
    if not usage.calls:
        return
    model = usage.model or "unknown"
    adds: list[tuple[str, str, float]] = [
        (TOKENS, label_field(model, "input"), usage.paid_input_tokens),
        (TOKENS, label_field(model, "output"), usage.paid_output_tokens),
        (COST, label_field(model, "paid"), usage.cost_paid),
        (COST, label_field(model, "uncached"), usage.cost_uncached),
    ]
    if subcalls:
        adds += [(SUBCALLS, label_field(model, "true"), usage.cache_hits),
                 (SUBCALLS, label_field(model, "false"), usage.calls - usage.cache_hits)]
    _add(client, adds)


def count_throttled(client: redis.Redis, model: str) -> None:
    """One 429 from ``model``'s provider; never raises."""
    _add(client, [(THROTTLED, label_field(model), 1)])


def _add(client: Any, adds: list[tuple[str, str, float]]) -> None:
    try:
        pipe = client.pipeline(transaction=False)
        for metric, field, n in adds:
            if not n:
                continue
            if isinstance(n, int):
                pipe.hincrby(metric_key(metric), field, n)
            else:
                pipe.hincrbyfloat(metric_key(metric), field, n)
        pipe.execute()
    except redis.RedisError:  # metrics never break a run; the run's own usage is still right
        logger.warning("fleet metrics not updated", exc_info=True)
