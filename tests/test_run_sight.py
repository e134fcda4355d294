"""Seeing a run (issue #10): its trajectory (`rlmq trace`, `Client.trace`), its usage and cost (paid
and uncached, against the stub's own counts), a dollar budget that refuses a batch before it is
paid for, live progress of a 500-prompt fan-out in `rlmq status`, and `submit --wait` printing the
answer.

The stub serves `openai/gpt-4o-mini` (a model LiteLLM's price table knows) for both the scripted
root LM and the sub-calls, through one `rlm` worker and two `llm` worker processes.
"""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from rlmq.client import Client
from tests.support.cli import cli_env, rlmq
from tests.support.fleet import Fleet, fleet_fixture, redis_url_of
from tests.support.stub_llm import ScriptedRoot, StubLLM, route
from tests.support.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_stub")]

MODEL = "openai/gpt-4o-mini"
SIGNATURE = "items: list[str] -> answers: list[str]"


def sub_answer(prompt: str) -> str:
    return "ok:" + prompt[-12:]


fleet = fleet_fixture(
    env={"RLMQ_LM": MODEL, "OPENAI_API_KEY": "stub-key", "RLMQ_RATE_LIMIT_RPS": "5000",
         "RLMQ_RATE_LIMIT_BURST": "5000", "RLMQ_LEASE_TTL": "30", "RLMQ_RUN_MAXIMA": "max_llm_calls=1000"},
    workers=[("rlm", "rlm1", 2), ("llm", "llmA", 16), ("llm", "llmB", 16)])


def submit(r, stub: StubLLM, steps: list[str], items: list[str], *, sub=None,
           **options) -> tuple[Client, str, ScriptedRoot]:
    script = ScriptedRoot(steps)
    stub.set_responder(route(root=script, sub=sub or sub_answer))
    client = Client(redis_url_of(r))
    run_id = client.submit(SIGNATURE, {"items": items}, max_iters=6, **options)
    return client, run_id, script


def finished(client: Client, run_id: str, timeout: float = 120.0):
    return client.wait(run_id, timeout=timeout, interval=0.1)


STEPS = [
    "print(len(items), items[0])",
    "answers = llm_query_batched([f'item {i}: {x}' for i, x in enumerate(items)])\nprint(answers[:2])",
    "SUBMIT(answers=answers)",
]


def test_trace_usage_and_cost_paid_vs_uncached(fleet: Fleet, stub: StubLLM, r, tmp_path) -> None:
    nonce = uuid.uuid4().hex[:8]  # nothing of this run is in any cache yet
    items = [f"{nonce} thing number {i}" for i in range(20)]
    client, run_id, script = submit(r, stub, STEPS, items)
    record = finished(client, run_id)
    assert record.status.value == "SUCCEEDED", record.error
    assert script.calls == [0, 1, 2]

    # The trajectory: every step's code and output, in order, kept in Redis as the run went.
    steps = client.trace(run_id)
    assert [s["code"] for s in steps] == STEPS and [s["step"] for s in steps] == [1, 2, 3]
    assert steps[0]["output"].startswith(f"20 {nonce} thing number 0")
    assert "ok:" in steps[1]["output"] and steps[1]["sub"]["calls"] == 20 and steps[0]["sub"]["calls"] == 0
    assert steps[2]["final"] and all(s["root"]["calls"] == 1 for s in steps)
    assert all(s["seconds"] >= s["exec_seconds"] >= 0 for s in steps)

    env = cli_env(tmp_path, REDIS_URL=redis_url_of(r))
    text = rlmq("trace", run_id, env=env, cwd=tmp_path)
    assert text.code == 0, text.stderr
    positions = [text.stdout.index(code.splitlines()[0]) for code in STEPS]
    assert positions == sorted(positions) and "── step 3 (code, final)" in text.stdout
    assert f"20 {nonce} thing number 0" in text.stdout
    lines = rlmq("trace", run_id, "--jsonl", env=env, cwd=tmp_path).stdout.splitlines()
    assert [json.loads(line)["code"] for line in lines] == STEPS

    # Usage equals what the stub itself served: requests and tokens.
    usage = client.result(run_id)["usage"]
    root, sub, total = usage["root"], usage["sub"], usage["total"]
    assert (root["calls"], sub["calls"]) == (3, 20)
    paid_calls = root["calls"] - root["cache_hits"] + sub["calls"] - sub["cache_hits"]
    assert paid_calls == stub.request_count == 23
    assert (total["paid_input_tokens"], total["paid_output_tokens"]) == stub.tokens_served
    assert total["priced"] and total["cost_paid"] > 0 and total["cost_paid"] == pytest.approx(total["cost_uncached"])
    status = json.loads(rlmq("status", run_id, "--json", env=env, cwd=tmp_path).stdout)
    assert status["progress"]["usage"]["total"]["cost_paid"] == total["cost_paid"]
    assert "paid" in rlmq("status", run_id, env=env, cwd=tmp_path).stdout

    # The same run again: all cached, $0 paid, the same uncached cost.
    stub.reset_stats()
    client2, rerun_id, _ = submit(r, stub, STEPS, items)
    assert finished(client2, rerun_id).status.value == "SUCCEEDED"
    assert stub.request_count == 0
    again = client2.result(rerun_id)["usage"]
    assert again["total"]["cost_paid"] == 0 and again["total"]["paid_input_tokens"] == 0
    assert again["total"]["cost_uncached"] == pytest.approx(total["cost_uncached"])
    assert again["root"]["cache_hits"] == 3 and again["sub"]["cache_hits"] == 20


def test_max_cost_refuses_the_batch_that_would_exceed_it(fleet: Fleet, stub: StubLLM, r) -> None:
    nonce = uuid.uuid4().hex[:8]
    steps = [
        "small = llm_query_batched([f'small {i} " + nonce + "' for i in range(5)])\nprint(small)",
        "big = llm_query_batched([('BIGBATCH " + nonce + " ' + 'x' * 4000 + str(i)) for i in range(200)])\nprint(len(big))",
        "SUBMIT(answers=small)",
    ]
    client, run_id, script = submit(r, stub, steps, ["a"], max_cost=0.004)
    record = finished(client, run_id)
    assert record.status.value == "STOPPED", (record.status, record.error)
    assert "max cost" in record.error and "200 sub-call" in record.error
    assert not any("BIGBATCH" in q.prompt for q in stub.requests), "the refused batch reached the LLM"
    assert stub.request_count == 2 + 5  # two root steps and the small batch; no third root call
    assert script.calls == [0, 1]
    trace = client.trace(run_id)
    assert len(trace) == 2 and "budget" in trace[1]["output"].lower()
    paid = record.progress.cost_usd
    assert 0 < paid <= 0.004


def test_status_shows_a_500_prompt_batch_while_it_runs(fleet: Fleet, stub: StubLLM, r, tmp_path) -> None:
    nonce = uuid.uuid4().hex[:8]
    steps = ["out = llm_query_batched([f'p{i} " + nonce + "' for i in range(500)])\nprint(len(out))",
             "SUBMIT(answers=out[:3])"]
    # The second half of the batch waits at the provider until the test has seen the batch mid-way:
    # how fast the fleet answers (or how slow a busy machine starts the CLI) cannot close the window.
    release = threading.Event()

    def held_sub(prompt: str) -> str:
        if int(prompt.split()[0][1:]) >= 250:
            release.wait(90)
        return sub_answer(prompt)

    client, run_id, _ = submit(r, stub, steps, ["a"], sub=held_sub, max_llm_calls=600)
    env = cli_env(tmp_path, REDIS_URL=redis_url_of(r))
    seen: list[dict] = []

    def mid_batch() -> bool:
        done = rlmq("status", run_id, "--json", env=env, cwd=tmp_path)
        progress = json.loads(done.stdout)["progress"]
        seen.append(progress)
        return 0 < progress.get("llm_calls", 0) < 500

    try:
        wait_until(mid_batch, timeout=60, interval=0.05, what="a sub-call count strictly between 0 and 500")
        assert seen[-1]["batch"]["total"] == 500 and 0 < seen[-1]["batch"]["done"] <= 250, seen[-1]
        line = rlmq("status", run_id, env=env, cwd=tmp_path).stdout
        assert "sub-LLM calls" in line
    finally:
        release.set()
    assert finished(client, run_id).status.value == "SUCCEEDED"
    assert client.status(run_id).progress.llm_calls == 500


def test_submit_wait_prints_the_outputs_on_stdout(fleet: Fleet, stub: StubLLM, r, tmp_path) -> None:
    script = ScriptedRoot(["SUBMIT(answers=[str(len(items)), items[0]])"])
    stub.set_responder(route(root=script, sub=sub_answer))
    env = cli_env(tmp_path, REDIS_URL=redis_url_of(r))
    (tmp_path / "items.json").write_text('["apple", "pear"]')
    done = rlmq("submit", "--signature", SIGNATURE, "--input", "items=@items.json", "--wait",
                env=env, cwd=tmp_path, timeout=120)
    assert done.code == 0, done.stderr
    run_id, rest = done.stdout.split("\n", 1)
    assert json.loads(rest) == {"answers": ["2", "apple"]}
    assert "succeeded" in done.stderr and len(run_id.strip()) == 32
    assert "step 1" in rlmq("trace", run_id.strip(), env=env, cwd=tmp_path).stdout


def test_workers_and_stats_show_the_fleet_at_work(fleet: Fleet, stub: StubLLM, r, tmp_path) -> None:
    nonce = uuid.uuid4().hex[:8]
    steps = ["out = llm_query_batched([f'w{i} " + nonce + "' for i in range(30)] * 2)\nprint(len(out))",
             "import time\nfor _ in range(300):\n    time.sleep(0.1)",
             "SUBMIT(answers=out[:1])"]
    client, run_id, _ = submit(r, stub, steps, ["a"])
    wait_until(lambda: client.status(run_id).progress.iteration == 2, timeout=60, interval=0.1,
               what="the run sleeping in step 2")
    env = cli_env(tmp_path, REDIS_URL=redis_url_of(r))
    done = rlmq("workers", "--json", env=env, cwd=tmp_path)
    assert done.code == 0, done.stderr
    workers = {w["name"].split("@")[0]: w for w in json.loads(done.stdout)}
    assert set(workers) == {"rlm1", "llmA", "llmB"}
    assert workers["rlm1"]["queues"] == ["rlm"] and workers["llmA"]["queues"] == ["llm"]
    [active] = workers["rlm1"]["active_runs"]
    assert active["run_id"] == run_id and active["llm_calls"] == 60
    assert sum(w["processed"].get("rlmq.llm_batch", 0) for w in workers.values()) >= 8
    assert f"run {run_id}" in rlmq("workers", env=env, cwd=tmp_path).stdout

    stats = json.loads(rlmq("stats", "--json", env=env, cwd=tmp_path).stdout)
    assert stats["subcalls"] == 60 and stats["cache_hits"] == 30  # the second 30 are the same prompts
    assert stats["cache_hit_rate"] == 0.5 and stats["live_sandboxes"] == 1 and stats["runs_running"] == 1
    assert stats["queues"] == {"rlm": 0, "llm": 0} and stats["rate_limited_429"] == 0
    assert "cache hit rate: 50%" in rlmq("stats", env=env, cwd=tmp_path).stdout
    client.cancel(run_id)
    assert finished(client, run_id, timeout=30).status.value == "CANCELLED"


def test_time_limit_stops_a_long_step_and_its_sandbox(fleet: Fleet, stub: StubLLM, r) -> None:
    steps = ["import time\nfor _ in range(600):\n    time.sleep(0.1)", "SUBMIT(answers=[])"]
    client, run_id, script = submit(r, stub, steps, ["a"], time_limit=3)
    record = finished(client, run_id, timeout=60)
    assert record.status.value == "STOPPED" and "time limit" in record.error, (record.status, record.error)
    assert record.finished_at - record.started_at < 15  # not the step's 60 s
    assert script.calls == [0]
    from workers.sandbox_registry import LeaseRegistry

    wait_until(lambda: LeaseRegistry(r, 30).live() == [], timeout=10, what="the sandbox released")
