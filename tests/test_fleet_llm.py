"""Sub-LLM fan-out through real ``llm`` worker processes, a real Redis and the stub LLM over HTTP.

Three ``celery -A tasks worker -Q llm -P threads`` processes serve the whole module; each test
gets an empty rlmq key space and a fresh stub record. Per-test limits travel as per-run options,
exactly as a run spec's overrides do; fleet-wide rate limits are the operator's, so the rate-limit
test gets workers of its own, started with those settings, on another Redis database.
"""

from __future__ import annotations

import itertools
import time

import dspy
import pytest

from rlmq.settings import Settings
from tasks.app import app
from tests.support.fleet import Fleet, fleet_fixture
from tests.support.stub_llm import FaultKind, StubLLM, chat_adapter_reply, default_responder
from workers.dspy_private import LLMCallBudget
from workers.engines import FleetLM
from workers.fanout import Fanout, plan_chunks
from workers.rlm import make_llm_tools
from workers.usage import RunUsage

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_stub")]

SUB_MODEL = "openai/stub-sub"


fleet = fleet_fixture(
    env={"RLMQ_LM": SUB_MODEL, "RLMQ_RATE_LIMIT_RPS": "1000", "RLMQ_RATE_LIMIT_BURST": "1000",
         "RLMQ_ALLOWED_MODELS": "openai/gpt-4o-mini"},  # a priced model for the cost test, pinned by the operator
    workers=[("llm", f"llm{i}", 16) for i in range(3)])


def make_fanout(stub: StubLLM, redis_server, usage: RunUsage | None = None, **overrides) -> Fanout:
    options = overrides.pop("options", {})
    settings = Settings(redis_url=redis_server.url, lm="openai/stub-root", sub_lm=SUB_MODEL,
                        lm_api_base=stub.api_base, **overrides)
    return Fanout(settings, app=app, options=options, observer=usage)


def sub_usage() -> RunUsage:
    return RunUsage(root_model="openai/stub-root", sub_model=SUB_MODEL)


def expected(prompt: str) -> str:
    return default_responder([{"role": "user", "content": prompt}], {})


def test_plan_chunks_keeps_order_and_spreads() -> None:
    assert plan_chunks(0, 8, 64) == []
    assert plan_chunks(3, 8, 64) == [(0, 1), (1, 2), (2, 3)]
    big = plan_chunks(500, 8, 64)
    assert len(big) == 64 and big[0][0] == 0 and big[-1][1] == 500
    assert all(a[1] == b[0] for a, b in itertools.pairwise(big))
    assert {e - s for s, e in big} <= {7, 8}
    assert len(plan_chunks(5000, 8, 64)) == 625


def test_batch_in_prompt_order_spread_over_workers(fleet: Fleet, stub: StubLLM, r, redis_server) -> None:
    stub.latency = 0.05
    usage = sub_usage()
    fanout = make_fanout(stub, redis_server, usage)
    tools = make_llm_tools(fanout, LLMCallBudget(1000))
    prompts = [f"chapter {i}: who is rich?" for i in range(200)]
    out = tools["llm_query_batched"](prompts)
    assert out == [expected(p) for p in prompts]
    assert stub.request_count == 200
    served = usage.progress().llm_workers
    assert len(served) >= 2, served
    assert set(served) <= {w.name for w in fleet.workers}
    assert tools["llm_query"]("one more") == expected("one more")


def test_batch_is_reserved_against_budget_up_front(fleet: Fleet, stub: StubLLM, r, redis_server) -> None:
    tools = make_llm_tools(make_fanout(stub, redis_server), LLMCallBudget(10))
    with pytest.raises(RuntimeError, match="LLM call limit exceeded"):
        tools["llm_query_batched"]([f"p{i}" for i in range(11)])
    assert stub.request_count == 0  # nothing was sent for the refused batch
    assert len(tools["llm_query_batched"]([f"p{i}" for i in range(10)])) == 10
    with pytest.raises(RuntimeError, match="LLM call limit exceeded"):
        tools["llm_query"]("over budget")


def test_cached_rerun_makes_no_requests_and_is_faster(fleet: Fleet, stub: StubLLM, r, redis_server) -> None:
    # 64 prompts in 16 messages (each message's 4 prompts asked at once): the cold pass takes at least
    # the stub's latency, 2 s, while the warm pass touches only Redis. A wide margin on a busy 2-core box.
    stub.latency = 2.0
    prompts = [f"summarise chapter {i}" for i in range(64)]
    first = make_fanout(stub, redis_server, fanout_width=16)
    t0 = time.perf_counter()
    cold = first.query(prompts)
    cold_s = time.perf_counter() - t0
    assert stub.request_count == 64 and not any(a.cached for a in cold)
    usage = sub_usage()
    second = make_fanout(stub, redis_server, usage, fanout_width=16)
    t0 = time.perf_counter()
    warm = second.query(prompts)
    warm_s = time.perf_counter() - t0
    assert stub.request_count == 64, "the rerun reached the LLM"
    assert [a.text for a in warm] == [a.text for a in cold]
    assert usage.progress().cache_hits == 64
    assert warm_s < cold_s / 3, (cold_s, warm_s)


def test_50_identical_concurrent_prompts_cost_one_request(fleet: Fleet, stub: StubLLM, r, redis_server) -> None:
    stub.latency = 0.5
    fanout = make_fanout(stub, redis_server, fanout_width=64)  # 50 sub-tasks of one prompt each
    answers = fanout.query(["What is the Count's fortune?"] * 50)
    assert stub.request_count == 1
    assert len({a.text for a in answers}) == 1 and all(a.ok for a in answers)
    assert sum(not a.cached for a in answers) == 1
    assert len({a.worker for a in answers}) >= 2  # the waiters really were on other processes


def test_a_sub_tasks_prompts_are_asked_at_once_and_a_repeated_one_once(fleet: Fleet, stub: StubLLM, r,
                                                                        redis_server) -> None:
    stub.latency = 2.0
    prompts = [f"who is prisoner {i}?" for i in range(6)]
    asked = [*prompts[:3], prompts[0], *prompts[3:], prompts[0], prompts[5]]
    fanout = make_fanout(stub, redis_server, chunk_size=len(asked), fanout_width=1)  # one sub-task
    answers = fanout.query(asked)
    assert [a.text for a in answers] == [expected(p) for p in asked]
    assert stub.request_count == 6  # one paid call per distinct prompt
    assert [a.cached for a in answers] == [False] * 3 + [True] + [False] * 3 + [True, True]
    assert len({a.worker for a in answers}) == 1
    arrivals = sorted(rec.at for rec in stub.requests)
    # all six were asked before the first could be answered (one after the other: 2 s apart)
    assert arrivals[-1] - arrivals[0] < stub.latency, arrivals


def test_two_sub_tasks_racing_on_the_same_prompts_pay_once(fleet: Fleet, stub: StubLLM, r, redis_server) -> None:
    stub.latency = 1.0
    prompts = [f"what did Faria know of {i}?" for i in range(12)]
    asked = prompts + prompts[::-1] + prompts
    fanout = make_fanout(stub, redis_server, chunk_size=len(prompts), fanout_width=3)  # three sub-tasks, same prompts
    answers = fanout.query(asked)
    assert [a.text for a in answers] == [expected(p) for p in asked]
    assert stub.request_count == 12
    assert sum(not a.cached for a in answers) == 12
    assert len({a.worker for a in answers}) >= 2  # the races really were between processes


def test_a_threads_worker_answers_at_most_its_concurrency_of_prompts_at_once(stub: StubLLM, redis_server) -> None:
    """A sub-task's prompts go at once, but an llm worker started with ``-c 3`` has 3 in flight at most
    (its prompt threads are its concurrency, not RLMQ_MAX_IN_FLIGHT's 128): ``-c`` bounds the first
    burst to a provider whose limit is not known yet, as it did when each thread asked one at a time."""
    from rlmq.celery_config import client_app

    stub.latency = 0.5
    url = redis_server.url.rsplit("/", 1)[0] + "/2"  # its own queues: only this worker takes its sub-calls
    with Fleet(url, {"RLMQ_LM": SUB_MODEL, "RLMQ_LM_API_BASE": stub.api_base}) as own:
        own.start("llm", name="three", concurrency=3)
        settings = Settings(redis_url=url, lm="openai/stub-root", sub_lm=SUB_MODEL, lm_api_base=stub.api_base,
                            chunk_size=12, fanout_width=2)  # two sub-tasks of 6 prompts, both held at once
        sender = client_app(url)
        try:
            stub.reset_stats()
            answers = Fanout(settings, app=sender).query([f"bounded {i}" for i in range(12)])
        finally:
            sender.close()
    assert [a.text for a in answers] == [expected(f"bounded {i}") for i in range(12)]
    assert stub.peak_in_flight == 3, stub.peak_in_flight


def test_rate_limit_holds_across_three_workers(stub: StubLLM, redis_server) -> None:
    from rlmq.celery_config import client_app

    rate, burst = 20, 5
    url = redis_server.url.rsplit("/", 1)[0] + "/1"  # its own queues: only these workers take its sub-calls
    env = {"RLMQ_LM": SUB_MODEL, "RLMQ_LM_API_BASE": stub.api_base,
           "RLMQ_RATE_LIMIT_RPS": str(rate), "RLMQ_RATE_LIMIT_BURST": str(burst)}
    with Fleet(url, env) as paced:
        workers = [paced.start("llm", name=f"paced{i}", concurrency=8, wait=False) for i in range(3)]
        paced.wait_ready(workers, timeout=120)
        settings = Settings(redis_url=url, lm="openai/stub-root", sub_lm=SUB_MODEL, lm_api_base=stub.api_base,
                            fanout_width=48)
        sender = client_app(url)
        try:
            usage = sub_usage()
            answers = Fanout(settings, app=sender, observer=usage).query([f"rate {i}" for i in range(130)])
        finally:
            sender.close()
    assert all(a.ok for a in answers)
    times = sorted(rec.at for rec in stub.requests)
    assert len(times) == 130
    worst = max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))
    # The limiter grants at most burst + rate in any second; the stub sees the requests after the workers'
    # threads send them, and on a loaded machine that transit jitters by a tenth of a second or more, which
    # bunches a few arrivals into one second. A quarter-second of jitter is allowed: a limiter that were
    # per worker (3x the rate) or absent (130 at once) still fails here, and the duration below proves pacing.
    assert worst <= rate * 1.25 + burst, f"{worst} requests in one second"
    assert times[-1] - times[0] >= (130 - burst) / rate - 0.5  # it really was paced
    assert len(usage.progress().llm_workers) == 3


def test_429_retry_after_pauses_the_whole_fleet(fleet: Fleet, stub: StubLLM, r, redis_server) -> None:
    stub.latency = 0.1
    stub.add_fault(FaultKind.RATE_LIMIT, count=1, retry_after=2)
    usage = sub_usage()
    fanout = make_fanout(stub, redis_server, usage, chunk_size=8, fanout_width=24)
    prompts = [f"paced {i}" for i in range(192)]
    answers = fanout.query(prompts)
    assert [a.text for a in answers] == [expected(p) for p in prompts]
    records = sorted(stub.requests, key=lambda rec: rec.at)
    t429 = next(rec.at for rec in records if rec.status == 429)
    # Requests already past the limiter when the 429 was read still land; then nothing for ~2 s.
    arrivals = [t429] + [rec.at for rec in records if rec.at > t429]
    gap, gap_start = max((b - a, a) for a, b in itertools.pairwise(arrivals))
    # (tolerances leave room for a loaded 2-core box; without the cooldown the gap is ~0.1 s)
    assert 1.5 <= gap <= 2.8 and gap_start - t429 < 1.0, (gap, gap_start - t429, [
        (round(a - t429, 3)) for a in arrivals if a < t429 + 3])
    assert len(usage.progress().llm_workers) >= 2


def test_faults_end_as_answer_or_error_and_workers_survive(fleet: Fleet, stub: StubLLM, r, redis_server) -> None:
    stub.add_fault(FaultKind.SERVER_ERROR, count=None, marker="ALWAYS500")
    stub.add_fault(FaultKind.SERVER_ERROR, count=1, marker="ONCE500")
    stub.add_fault(FaultKind.TIMEOUT, count=None, marker="HANG", hang_seconds=5)
    stub.add_fault(FaultKind.MALFORMED, count=None, marker="ALWAYSBAD")
    stub.add_fault(FaultKind.MALFORMED, count=1, marker="ONCEBAD")
    stub.add_fault(FaultKind.EMPTY, count=None, marker="ALWAYSEMPTY")
    stub.add_fault(FaultKind.EMPTY, count=1, marker="ONCEEMPTY")
    fanout = make_fanout(stub, redis_server, options={"lm_timeout": 1, "lm_retries": 2})
    tools = make_llm_tools(fanout, LLMCallBudget(100))
    prompts = ["ALWAYS500", "ONCE500", "HANG", "ALWAYSBAD", "ONCEBAD", "ALWAYSEMPTY", "ONCEEMPTY", "fine"]
    out = dict(zip(prompts, tools["llm_query_batched"](prompts), strict=True))
    for p in ("ONCE500", "ONCEBAD", "ONCEEMPTY", "fine"):
        assert out[p] == expected(p), (p, out[p])
    for p in ("ALWAYS500", "HANG", "ALWAYSBAD", "ALWAYSEMPTY"):
        assert out[p].startswith("[ERROR] "), (p, out[p])
    assert "empty completion" in out["ALWAYSEMPTY"]
    assert tools["llm_query"]("ALWAYS500").startswith("[ERROR] ")
    # errors are not cached: the stub sees the always-failing prompt again
    before = stub.request_count
    assert tools["llm_query"]("ALWAYSBAD").startswith("[ERROR] ")
    assert stub.request_count == before + 3
    assert all(w.alive for w in fleet.workers)
    fleet.wait_ready(timeout=10)


def test_gather_timeout_revokes_stragglers(fleet: Fleet, stub: StubLLM, r, redis_server) -> None:
    stub.add_fault(FaultKind.TIMEOUT, count=None, marker="STUCK", hang_seconds=3)
    fanout = make_fanout(stub, redis_server, gather_timeout=1.0, options={"lm_timeout": 2.5, "lm_retries": 0})
    t0 = time.perf_counter()
    answers = fanout.query(["quick one", "STUCK forever", "quick two"])
    assert time.perf_counter() - t0 < 2.0
    assert answers[0].text == expected("quick one") and answers[2].text == expected("quick two")
    assert not answers[1].ok and "timed out" in (answers[1].error or "")
    time.sleep(2.6)  # let the hung call end so the next test starts clean


def test_fleet_lm_routes_dspy_sub_agents(fleet: Fleet, stub: StubLLM, r, redis_server) -> None:
    stub.set_responder(lambda messages, body: chat_adapter_reply({"answer": "Edmond Dantès"}))
    usage = sub_usage()
    lm = FleetLM(make_fanout(stub, redis_server, usage))
    assert isinstance(lm, dspy.BaseLM) and lm.model == SUB_MODEL
    pred = dspy.Predict("question -> answer")(question="Who is the Count?", lm=lm)
    assert pred.answer == "Edmond Dantès"
    assert stub.request_count == 1 and stub.requests[0].model == "stub-sub"
    assert usage.progress().llm_calls == 1
    stub.add_fault(FaultKind.SERVER_ERROR, count=None)
    with pytest.raises(dspy.LMError):
        dspy.Predict("question -> answer")(question="And now?", lm=lm)


@pytest.mark.parametrize("client", ["litellm", "http"])
def test_both_lm_clients_retry_and_report_usage_and_cost(client, fleet: Fleet, stub: StubLLM, r, redis_server) -> None:
    stub.add_fault(FaultKind.SERVER_ERROR, count=1, marker="first")
    stub.add_fault(FaultKind.RATE_LIMIT, count=1, marker="second", retry_after=0.3)
    settings_model = "openai/gpt-4o-mini"  # a model LiteLLM has a price for, served by the stub
    settings = Settings(redis_url=redis_server.url, lm="openai/x", sub_lm=settings_model, lm_api_base=stub.api_base)
    usage = RunUsage(root_model="openai/x", sub_model=settings_model)
    answers = Fanout(settings, app=app, options={"lm_client": client}, observer=usage).query(["first prompt", "second prompt", "third prompt"])
    assert [a.text for a in answers] == [expected(p) for p in ("first prompt", "second prompt", "third prompt")]
    assert [a.attempts for a in answers] == [2, 2, 1]
    assert all(a.usage["total_tokens"] > 0 and (a.cost or 0) > 0 for a in answers)
    assert {rec.model for rec in stub.requests} == {"gpt-4o-mini"}
    assert usage.progress().cost_usd > 0 and usage.usage().sub.priced
