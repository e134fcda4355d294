"""Prometheus metrics (issue #20): the fleet's counters in Redis, ``rlmq exporter``'s ``/metrics``, and a
real Prometheus (Debian's ``prometheus``) scraping it while two scripted runs go through a real fleet.

The fast tests check the counters where they are written (a run's end counted once, by the write that
ended it) and what the exporter reads from the fleet's state; the slow one checks, through Prometheus'
HTTP API, that the sub-call and dollar totals equal the runs' own usage.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rlmq.client import Client
from rlmq.exporter import FleetCollector
from rlmq.stack import exporter_command
from rlmq.store import keys, metrics
from rlmq.store.records import CallUsage, RunSpec, RunStatus, RunStore
from tests.support.fleet import Fleet, fleet_fixture, redis_url_of
from tests.support.net import free_port, http_get
from tests.support.prometheus import PROMETHEUS, query, start_prometheus
from tests.support.stub_llm import ScriptedRoot, StubLLM, route
from tests.support.wait import wait_until

MODEL = "openai/gpt-4o-mini"  # priced by LiteLLM's table: the dollars are not zero
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "rlmq.json"


def dashboard_queries() -> list[str]:
    return [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]


def scrape(r) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    """What ``/metrics`` would show now: {sample name: {labels: value}}, parsed by prometheus_client."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(r))
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def test_a_run_end_is_counted_once_with_its_duration(r) -> None:
    store = RunStore(r)
    for run_id in ("ran", "queued"):
        store.create(RunSpec(run_id=run_id, signature="a -> b", inputs={}))
    r.hset(keys.run_key("ran"), mapping={"status": "RUNNING", "started_at": repr(time.time() - 20)})
    assert store.finish("ran", RunStatus.SUCCEEDED, attempt=1)
    assert store.finish("ran", RunStatus.SUCCEEDED, attempt=1)  # a retried write (lost reply): not counted again
    assert not store.finish("ran", RunStatus.FAILED)
    assert store.finish("queued", RunStatus.CANCELLED, expect=RunStatus.QUEUED)  # never started: no duration
    seen = scrape(r)
    assert seen["rlmq_runs_total"] == {frozenset({("status", "SUCCEEDED")}): 1.0,
                                       frozenset({("status", "CANCELLED")}): 1.0}
    buckets = {dict(k)["le"]: v for k, v in seen["rlmq_run_duration_seconds_bucket"].items()}
    assert (buckets["15.0"], buckets["30.0"], buckets["+Inf"]) == (0, 1, 1)
    assert seen["rlmq_run_duration_seconds_count"][frozenset()] == 1
    assert 20 <= seen["rlmq_run_duration_seconds_sum"][frozenset()] < 25


def test_exporter_reads_usage_limits_leases_and_queues_from_redis(r) -> None:
    metrics.add_usage(r, CallUsage(model=MODEL, calls=5, cache_hits=2, paid_input_tokens=30, paid_output_tokens=9,
                                   cost_paid=0.25, cost_uncached=0.5), subcalls=True)
    metrics.add_usage(r, CallUsage(model="openai/root", calls=1, paid_input_tokens=7, cost_paid=0.125,
                                   cost_uncached=0.125), subcalls=False)  # root calls: no sub-call count
    metrics.count_throttled(r, MODEL)
    now = time.time()
    r.hset(keys.limit_state_key(MODEL), mapping={"rate": "42.5", "mode": "headers"})
    r.zadd(keys.slots_key(MODEL), {"live-1": (now + 60) * 1e6, "live-2": (now + 60) * 1e6, "expired": 1})
    r.zadd(keys.runs_active_key(), {"run-a": now})
    leases = {"sbx-1": ("local", now + 60), "sbx-old": ("daytona", now - 60)}
    for sandbox_id, (backend, expires) in leases.items():
        r.zadd(keys.leases_index_key(), {sandbox_id: expires})
        r.set(keys.lease_key(sandbox_id), json.dumps({
            "backend": backend, "sandbox_id": sandbox_id, "host": "h", "run_id": "run-a", "owner": "o",
            "expires_at": expires}))
    r.rpush("llm", "not-a-message", "neither")  # Kombu's list for the llm queue
    try:
        seen = scrape(r)
    finally:  # no worker of a later module may meet these
        r.delete("llm", keys.leases_index_key(), *(keys.lease_key(i) for i in leases))
    sub = {dict(k)["cached"]: v for k, v in seen["rlmq_subcalls_total"].items()}
    assert sub == {"true": 2, "false": 3}
    tokens = {(dict(k)["model"], dict(k)["direction"]): v for k, v in seen["rlmq_lm_tokens_total"].items()}
    assert tokens == {(MODEL, "input"): 30, (MODEL, "output"): 9, ("openai/root", "input"): 7}
    cost = {(dict(k)["model"], dict(k)["kind"]): v for k, v in seen["rlmq_cost_dollars_total"].items()}
    assert cost == {(MODEL, "paid"): 0.25, (MODEL, "uncached"): 0.5, ("openai/root", "paid"): 0.125,
                    ("openai/root", "uncached"): 0.125}
    assert seen["rlmq_throttled_total"] == {frozenset({("model", MODEL)}): 1}
    assert seen["rlmq_rate_limit_rps"] == {frozenset({("model", MODEL)}): 42.5}
    assert seen["rlmq_in_flight"] == {frozenset({("model", MODEL)}): 2}
    assert seen["rlmq_sandboxes_live"] == {frozenset({("backend", "local")}): 1}
    assert seen["rlmq_queue_depth"] == {frozenset({("queue", "rlm")}): 0, frozenset({("queue", "llm")}): 2}
    assert seen["rlmq_runs_active"] == {frozenset(): 1}


def test_the_grafana_dashboard_shows_every_metric_and_only_those(r) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(r))  # an empty fleet: every family is still declared
    families = {f.name + ("_total" if f.type == "counter" else ""): f.type
                for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert len(families) == 11, families
    used = {name for expr in dashboard_queries() for name in re.findall(r"\brlmq_\w+", expr)}
    served = {name + suffix if kind == "histogram" else name
              for name, kind in families.items() for suffix in ("_bucket", "_sum", "_count")}
    assert used <= served, used - served
    assert set(families) <= {re.sub(r"_bucket$", "", name) for name in used}, set(families) - used


# ---- a real Prometheus scraping `rlmq exporter` while a real fleet runs two runs ---------------------------
fleet = fleet_fixture(
    env={"RLMQ_LM": MODEL, "OPENAI_API_KEY": "stub-key", "RLMQ_RATE_LIMIT_RPS": "5000",
         "RLMQ_RATE_LIMIT_BURST": "5000"},
    workers=[("rlm", "rlm1", 2), ("llm", "llmA", 16)])

STEPS = [
    "answers = llm_query_batched([f'item {i}: {x}' for i, x in enumerate(items)])\nprint(answers[:2])",
    "SUBMIT(answers=answers)",
]


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (apt-get install prometheus)")
def test_prometheus_scrapes_the_fleet_totals_of_two_runs(fleet: Fleet, stub: StubLLM, r, tmp_path) -> None:
    port = free_port()
    exporter = fleet.stack.spawn("exporter", exporter_command(port=port, address="127.0.0.1"))
    prometheus = None
    try:
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/metrics")[0] == 200, 30, "rlmq exporter serving")
        url, prometheus = start_prometheus(fleet.stack.spawn, tmp_path, [f"127.0.0.1:{port}"])

        nonce = uuid.uuid4().hex[:8]
        items = [f"{nonce} thing {i}" for i in range(12)]
        client = Client(redis_url_of(r))
        usages = []
        for _ in range(2):  # the second run is answered by the caches: cached sub-calls, $0 paid
            stub.set_responder(route(root=ScriptedRoot(STEPS), sub=lambda p: "ok:" + p[-8:]))
            run_id = client.submit("items: list[str] -> answers: list[str]", {"items": items}, max_iters=4)
            record = client.wait(run_id, timeout=120, interval=0.1)
            assert record.status.value == "SUCCEEDED", record.error
            usages.append(client.result(run_id)["usage"])
        subs = [u["sub"] for u in usages]
        assert [s["calls"] for s in subs] == [12, 12] and subs[1]["cache_hits"] == 12

        def scraped() -> dict | None:
            runs = query(url, 'rlmq_runs_total{status="SUCCEEDED"}')
            return runs if sum(runs.values()) == 2 else None

        wait_until(scraped, 30, "Prometheus scraping both runs' end", interval=0.5)
        time.sleep(2)  # one more scrape: every counter written before the runs ended is in it
        cached = {dict(k)["cached"]: v for k, v in query(url, "sum by (cached) (rlmq_subcalls_total)").items()}
        assert cached == {"false": sum(s["calls"] - s["cache_hits"] for s in subs),
                          "true": sum(s["cache_hits"] for s in subs)}
        cost = {dict(k)["kind"]: v for k, v in query(url, "sum by (kind) (rlmq_cost_dollars_total)").items()}
        totals = [u["total"] for u in usages]
        assert cost["paid"] > 0 and cost["paid"] == pytest.approx(sum(t["cost_paid"] for t in totals), rel=1e-6)
        assert cost["uncached"] == pytest.approx(sum(t["cost_uncached"] for t in totals), rel=1e-6)
        tokens = {dict(k)["direction"]: v for k, v in query(url, "sum by (direction) (rlmq_lm_tokens_total)").items()}
        assert tokens == {"input": sum(t["paid_input_tokens"] for t in totals),
                          "output": sum(t["paid_output_tokens"] for t in totals)}
        assert sum(query(url, "rlmq_run_duration_seconds_count").values()) == 2
        for expr in dashboard_queries():  # the dashboard's PromQL, evaluated by Prometheus itself
            query(url, expr)
        assert set(query(url, "rlmq_queue_depth")) == {frozenset({("__name__", "rlmq_queue_depth"), ("queue", q),
                                                                  ("instance", f"127.0.0.1:{port}"),
                                                                  ("job", "rlmq")}) for q in ("rlm", "llm")}
    finally:
        for child in (prometheus, exporter):
            if child is not None:
                child.stop(5.0)
                fleet.stack.children.remove(child)
