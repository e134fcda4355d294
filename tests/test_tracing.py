"""OpenTelemetry traces (issue #20): one trace per run, from the run worker's ``rlmq.run`` span down to each
prompt's span on the llm workers, exported over OTLP/HTTP to a real receiver (``tests.support.otlp_receiver``
decodes what the SDK's exporter sends with OpenTelemetry's own protobuf classes).

The fleet test runs a scripted run with a 40-prompt fan-out over two llm worker processes; the fast
tests check a resumed attempt's spans join the run's trace, a caller's trace is joined by a submitted
run, and nothing of OpenTelemetry is imported when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is unset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from rlmq.client import Client
from tests.support.fleet import REPO_ROOT, Fleet, redis_url_of, started_fleet
from tests.support.net import http_get
from tests.support.otlp_receiver import OTLPReceiver, Span
from tests.support.phoenix import PHOENIX, phoenix_server, phoenix_spans
from tests.support.screenshots import chromium_missing, screenshot
from tests.support.stub_llm import ScriptedRoot, StubLLM, route
from tests.support.wait import wait_until

MODEL = "openai/gpt-4o-mini"


WORKERS = [("rlm", "rlm1", 2), ("llm", "llmA", 8), ("llm", "llmB", 8)]  # a fan-out over two llm worker processes


def fleet_env(stub: StubLLM, endpoint: str) -> dict[str, str]:
    return {"RLMQ_LM": MODEL, "OPENAI_API_KEY": "stub-key", "RLMQ_LM_API_BASE": stub.api_base,
            "RLMQ_RATE_LIMIT_RPS": "5000", "RLMQ_RATE_LIMIT_BURST": "5000", "RLMQ_FANOUT_WIDTH": "8",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200",
            "RLMQ_ALLOWED_TOOLS": "tests.support.sample_tools:count_words"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    sink = OTLPReceiver()
    yield sink
    sink.close()


@pytest.fixture(scope="module")
def traced_fleet(redis_server, stub: StubLLM, receiver: OTLPReceiver) -> Iterator[Fleet]:
    env = {**fleet_env(stub, receiver.endpoint), "RLMQ_LOG_FORMAT": "json"}
    with started_fleet(redis_server.url, env, WORKERS) as fleet:
        yield fleet


def children(spans: list[Span], parent: Span, name: str) -> list[Span]:
    return [s for s in spans if s.parent_id == parent.span_id and s.name == name]


STEPS = ["answers = llm_query_batched([f'q {i} {x}' for i, x in enumerate(items)])\n"
         "print(len(answers), count_words('one two three'))",
         "SUBMIT(answers=answers)"]


def run_with_fanout(fleet: Fleet, stub: StubLLM, r) -> tuple[str, dict]:
    """A scripted run: a 40-prompt batch, then SUBMIT; (run id, its usage)."""
    nonce = uuid.uuid4().hex[:8]
    stub.set_responder(route(root=ScriptedRoot(STEPS), sub=lambda p: "a:" + p[-6:]))
    client = Client(redis_url_of(r))
    run_id = client.submit("items: list[str] -> answers: list[str]", {"items": [f"{nonce}-{i}" for i in range(40)]},
                           max_iters=4, tools=["tests.support.sample_tools:count_words"])
    record = client.wait(run_id, timeout=120, interval=0.1)
    assert record.status.value == "SUCCEEDED", record.error
    return run_id, client.result(run_id)["usage"]


def complete(spans: list[Span]) -> list[Span] | None:
    return spans if sum(s.name == "rlmq.prompt" for s in spans) == 40 and any(
        s.name == "rlmq.run" for s in spans) else None


def check_run_trace(spans: list[Span], run_id: str, usage: dict, llm_pids: set[int]) -> None:
    """One trace: run -> 2 iterations -> root-LM call + code -> batch -> sub-tasks (both llm workers) -> 40 prompts."""
    (run,) = [s for s in spans if s.name == "rlmq.run"]
    assert run.parent_id == "" and run.attributes["rlmq.run_id"] == run_id and run.attributes["rlmq.attempt"] == 1
    assert run.attributes["rlmq.status"] == "SUCCEEDED"
    assert run.attributes["rlmq.usage.sub_calls"] == 40
    assert run.attributes["rlmq.cost_paid_usd"] == pytest.approx(usage["total"]["cost_paid"])
    iterations = sorted(children(spans, run, "rlmq.iteration"), key=lambda s: s.attributes["rlmq.iteration"])
    assert [s.attributes["rlmq.iteration"] for s in iterations] == [1, 2]
    for step in iterations:
        (lm,) = children(spans, step, "rlmq.root_lm")
        assert lm.attributes["gen_ai.request.model"] == MODEL and lm.attributes["gen_ai.usage.input_tokens"] > 0
        assert lm.attributes["gen_ai.usage.output_tokens"] > 0
    root_in = sum(children(spans, s, "rlmq.root_lm")[0].attributes["gen_ai.usage.input_tokens"] for s in iterations)
    assert root_in == usage["root"]["input_tokens"]
    (code,) = children(spans, iterations[0], "rlmq.code")
    (batch,) = children(spans, code, "rlmq.batch")
    (tool,) = children(spans, code, "rlmq.tool")  # a user tool's call, under the code that made it
    assert tool.attributes["rlmq.tool"] == "count_words" and tool.start_ns >= batch.end_ns - 1_000_000
    assert batch.attributes["rlmq.prompts"] == 40
    subtasks = children(spans, batch, "rlmq.llm_batch")
    assert len(subtasks) >= 2 and sum(s.attributes["rlmq.prompts"] for s in subtasks) == 40
    assert {s.attributes["process.pid"] for s in subtasks} == llm_pids, "sub-task spans come from both llm workers"
    prompts = [p for s in subtasks for p in children(spans, s, "rlmq.prompt")]
    assert len(prompts) == 40 and not any(p.attributes["rlmq.cached"] for p in prompts)
    assert sum(p.attributes["gen_ai.usage.input_tokens"] for p in prompts) == usage["sub"]["input_tokens"]
    slack = 1_000_000  # 1 ms: Phoenix keeps microseconds
    assert all(batch.start_ns - slack <= p.start_ns and p.end_ns <= batch.end_ns + slack for p in prompts)


def llm_pids(fleet: Fleet) -> set[int]:
    return {w.proc.pid for w in fleet.workers if w.queue == "llm"}


@pytest.mark.slow
def test_a_run_is_one_trace_down_to_each_prompt_on_the_llm_workers(traced_fleet: Fleet, stub: StubLLM, r,
                                                                  receiver: OTLPReceiver) -> None:
    run_id, usage = run_with_fanout(traced_fleet, stub, r)
    # The run's id is its trace id.
    spans = wait_until(lambda: complete(receiver.trace(run_id)), 30, "the run's spans at the receiver", interval=0.2)
    check_run_trace(spans, run_id, usage, llm_pids(traced_fleet))
    (run,) = [s for s in spans if s.name == "rlmq.run"]
    assert run.pid not in llm_pids(traced_fleet) and run.service == "rlmq"

    # RLMQ_LOG_FORMAT=json: the run worker's lines are JSON objects naming the run, its attempt and its span.
    (rlm,) = [w for w in traced_fleet.workers if w.queue == "rlm"]
    lines = [json.loads(line) for line in rlm.child.log_path.read_text().splitlines() if line.startswith("{")]
    started = [line for line in lines if line.get("run_id") == run_id and "starts" in line["message"]]
    assert started and started[0]["attempt"] == 1 and started[0]["trace_id"] == run_id
    assert started[0]["span_id"] == run.span_id and started[0]["level"] == "INFO"
    assert any("ready." in line["message"] for line in lines)  # Celery's own lines are JSON too


@pytest.mark.slow
@pytest.mark.skipif(PHOENIX is None, reason="Arize Phoenix is not installed (too heavy for CI: ~4 min, 850 MB, "
                                            "~47 s to start); set RLMQ_TEST_PHOENIX=/path/to/phoenix")
def test_phoenix_shows_the_run_as_one_trace(redis_server, stub: StubLLM, r, tmp_path) -> None:
    with phoenix_server(tmp_path) as url:
        with started_fleet(redis_server.url, fleet_env(stub, url), WORKERS) as fleet:
            run_id, usage = run_with_fanout(fleet, stub, r)
            seen: list[list[Span]] = [[]]

            def stored() -> list[Span] | None:
                seen[0] = phoenix_spans(url, run_id)
                return complete(seen[0])

            try:
                spans = wait_until(stored, 120, "the run's spans in Phoenix", interval=1.0)
            except AssertionError:
                raise AssertionError(f"Phoenix has {Counter(s.name for s in seen[0])} of run {run_id}") from None
            check_run_trace(spans, run_id, usage, llm_pids(fleet))
        shots = os.environ.get("RLMQ_PHOENIX_SCREENSHOT")
        if shots and chromium_missing() is None:  # a picture of the trace view, for a human to look at
            project = json.loads(http_get(f"{url}/v1/projects")[1])["data"][0]["id"]
            screenshot(f"{url}/projects/{project}/traces/{run_id}", shots, size="1600,1000", wait_ms=8000)


def _spans_in_process(receiver: OTLPReceiver, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    import workers.tracing as tracing

    monkeypatch.setattr(tracing, "_tracer", None)  # a provider of this test's own, exporting to the receiver
    monkeypatch.setattr(tracing, "_provider", None)


def test_a_resumed_attempt_and_a_callers_trace(receiver: OTLPReceiver, monkeypatch) -> None:
    _spans_in_process(receiver, monkeypatch)
    from opentelemetry.sdk.trace import TracerProvider

    from workers.tracing import run_spans

    run_id = uuid.uuid4().hex
    for attempt in (1, 2):  # the first attempt's worker died; the second replays
        spans = run_spans(run_id, attempt, "a -> b")
        with spans.iteration(1):
            pass
        spans.end("SUCCEEDED" if attempt == 2 else "REQUEUED")
    got = wait_until(lambda: (lambda t: t if len(t) == 4 else None)(receiver.trace(run_id)), 10, "4 spans")
    runs = sorted((s for s in got if s.name == "rlmq.run"), key=lambda s: s.attributes["rlmq.attempt"])
    assert [s.attributes["rlmq.attempt"] for s in runs] == [1, 2] and runs[1].events == ["rlmq.resumed"]

    # A run submitted inside the caller's span is a child of it, in the caller's trace.
    caller = TracerProvider().get_tracer("caller")
    with caller.start_as_current_span("my-pipeline") as mine:
        from rlmq.trace_context import caller_traceparent

        parent = caller_traceparent()
    trace_id = format(mine.get_span_context().trace_id, "032x")
    assert parent.split("-")[1] == trace_id
    spans = run_spans(uuid.uuid4().hex, 1, "a -> b", parent)
    spans.end("SUCCEEDED")
    (joined,) = wait_until(lambda: receiver.trace(trace_id), 10, "the joined run span")
    assert joined.parent_id == format(mine.get_span_context().span_id, "016x")


def test_a_sub_tasks_prompts_and_a_repeat_each_have_a_described_span(receiver: OTLPReceiver, stub: StubLLM,
                                                                      redis_url: str, monkeypatch) -> None:
    """In-process ``llm_batch``: each prompt's span carries its outcome, and a prompt repeated within the
    sub-task (asked once) gets its own span, cached, with the tokens of the answer it copies."""
    _spans_in_process(receiver, monkeypatch)
    for name, value in {"REDIS_URL": redis_url, "RLMQ_LM": MODEL, "OPENAI_API_KEY": "stub-key",
                        "RLMQ_LM_API_BASE": stub.api_base}.items():
        monkeypatch.setenv(name, value)
    from workers.batch_answer import answer_batch
    from workers.context import redis_client, worker_settings

    worker_settings.cache_clear()
    redis_client.cache_clear()
    trace_id = uuid.uuid4().hex
    try:
        faria, dantes = f"who is Faria? {trace_id}", f"who is Dantes? {trace_id}"  # this test's own prompts
        answers = answer_batch([faria, dantes, faria], MODEL, None, None, worker="w1",
                               traceparent=f"00-{trace_id}-{'1' * 16}-01")
    finally:
        worker_settings.cache_clear()
        redis_client.cache_clear()
    asked = [r for r in stub.requests if trace_id in r.prompt]  # the stub is shared: others' requests left out
    assert [a["cached"] for a in answers] == [False, False, True] and len(asked) == 2, len(asked)
    spans = wait_until(lambda: (lambda t: t if len(t) == 4 else None)(receiver.trace(trace_id)), 10, "4 spans")
    (subtask,) = [s for s in spans if s.name == "rlmq.llm_batch"]
    prompts = children(spans, subtask, "rlmq.prompt")
    assert sorted(p.attributes["rlmq.cached"] for p in prompts) == [False, False, True]
    (copy,) = [p for p in prompts if p.attributes["rlmq.cached"]]
    assert copy.attributes["rlmq.attempts"] == 0 and copy.attributes["gen_ai.usage.input_tokens"] > 0
    assert all(p.attributes["rlmq.attempts"] == 1 for p in prompts if p is not copy)


def test_nothing_of_opentelemetry_is_imported_when_tracing_is_off() -> None:
    code = """
import sys
from workers.tracing import NULL_SPANS, run_spans, subtask_span
spans = run_spans("ab" * 16, 1, "a -> b")
assert spans is NULL_SPANS
with spans.iteration(1), spans.code(), spans.batch(3, "m") as headers, subtask_span(None, 3, "m", "w") as p:
    with p(cached=False):
        pass
spans.end("SUCCEEDED")
assert headers == {}
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk") or "otlp" in m)
assert not loaded, loaded
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
