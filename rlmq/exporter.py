"""``rlmq exporter``: the whole fleet's Prometheus metrics at ``/metrics``, read from Redis at each scrape.

One exporter serves the fleet (no per-worker scrape): the counters are the totals the fleet keeps
in Redis (``rlmq.store.metrics``), the gauges are read from the state the fleet keeps anyway (active
runs, the limiters' learned rates and in-flight leases, sandbox leases, Kombu's queue lists).
``prometheus_client`` (already installed with Flower) formats them; it is imported by this module
only, so ``import rlmq`` stays light.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from rlmq.celery_config import QUEUES
from rlmq.fleet import queue_depth
from rlmq.store import keys, metrics, replies

__all__ = ["FleetCollector", "serve"]

_HELP = {
    metrics.RUNS: "Runs ended, by final status.",
    metrics.SUBCALLS: "Sub-LLM calls (llm_query) answered, by model and whether the response cache answered.",
    metrics.TOKENS: "Tokens processed by the provider (cache hits excluded), by model and direction.",
    metrics.COST: "Dollars by model: paid (billed) and uncached (what the same calls cost without the cache).",
    metrics.THROTTLED: "429 (rate limited) replies from the provider, by model.",
}


class FleetCollector(Collector):
    """Everything ``/metrics`` shows, read from the fleet's Redis when Prometheus asks."""

    def __init__(self, redis_client: Any) -> None:
        self.redis = redis_client

    def collect(self) -> Iterator[Metric]:
        r = self.redis
        for name, help_text in _HELP.items():
            family = CounterMetricFamily(name, help_text, labels=list(metrics.LABELS[name]))
            for field, value in r.hgetall(keys.metric_key(name)).items():
                labels = metrics.label_values(field)
                if len(labels) == len(metrics.LABELS[name]):
                    family.add_metric(labels, float(value))
            yield family
        yield self._duration()
        yield GaugeMetricFamily("rlmq_runs_active", "Runs started (or restarted) and not ended.",
                                value=int(r.zcard(keys.runs_active_key())))
        now = time.time()
        rate = GaugeMetricFamily("rlmq_rate_limit_rps", "The fleet's learned request rate per model (requests/s).",
                                 labels=["model"])
        for model, raw in self._per_model(keys.limit_state_key, lambda key: r.hget(key, "rate")):
            if raw is not None:
                rate.add_metric([model], float(raw))
        yield rate
        in_flight = GaugeMetricFamily("rlmq_in_flight", "LM requests in flight per model, fleet-wide.",
                                      labels=["model"])
        for model, n in self._per_model(keys.slots_key, lambda key: r.zcount(key, now * 1e6, "+inf")):
            in_flight.add_metric([model], int(n))
        yield in_flight
        yield self._sandboxes(now)
        depth = GaugeMetricFamily("rlmq_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"])
        for queue in QUEUES:
            depth.add_metric([queue], queue_depth(r, queue))
        yield depth

    def _duration(self) -> Metric:
        raw = {replies.text(k): v for k, v in self.redis.hgetall(keys.metric_key(metrics.RUN_DURATION)).items()}
        buckets, seen = [], 0
        for i, bound in enumerate(metrics.DURATION_BUCKETS, start=1):
            seen += int(raw.get(str(i), 0))
            buckets.append((repr(bound), seen))
        buckets.append(("+Inf", int(raw.get("count", 0))))
        return HistogramMetricFamily(metrics.RUN_DURATION, "Wall time of ended runs, from their last start (seconds).",
                                     buckets=buckets, sum_value=float(raw.get("sum", 0.0)))

    def _per_model(self, key_of: Any, read: Any) -> Iterator[tuple[str, Any]]:
        # SCAN, not KEYS: the limiter's keys are few but the keyspace (caches) is large.
        pattern = key_of("*")
        for key in self.redis.scan_iter(match=pattern, count=1000):
            name = replies.text(key)
            yield name[len(pattern) - 1:], read(name)

    def _sandboxes(self, now: float) -> Metric:
        live = GaugeMetricFamily("rlmq_sandboxes_live", "Sandboxes with a live lease, by backend.",
                                 labels=["backend"])
        ids = replies.members(self.redis.zrangebyscore(keys.leases_index_key(), now, "+inf"))
        counts: dict[str, int] = {}
        for raw in self.redis.mget([keys.lease_key(i) for i in ids]) if ids else []:
            if raw is not None:
                backend = str(json.loads(raw).get("backend") or "unknown")
                counts[backend] = counts.get(backend, 0) + 1
        for backend, n in sorted(counts.items()):
            live.add_metric([backend], n)
        return live


def serve(redis_client: Any, address: str, port: int) -> None:
    """Serve ``/metrics`` until interrupted."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(redis_client))
    server, thread = start_http_server(port, addr=address, registry=registry)
    try:
        thread.join()
    finally:
        server.shutdown()
