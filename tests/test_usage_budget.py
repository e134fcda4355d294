"""Usage accounting, prices, budgets and the views' formatting, without a fleet: real objects, real Redis
where a key is written, a real ``dspy.LM`` against the stub for the root-LM history."""

from __future__ import annotations

import json

import dspy
import pytest

from rlmq.flower_repr import describe_value, task_reprs
from rlmq.progress import format_progress
from rlmq.run_options import with_options
from rlmq.settings import Settings, SettingsError
from rlmq.store.records import Batch, CallUsage, Progress, RunRecord, RunSandbox, RunSpec, RunStatus, Usage
from rlmq.trace import format_trace, read_trajectory
from workers.answer import Answer
from workers.budget import Budget, BudgetExceeded
from workers.monitor import summary_line
from workers.pricing import estimate_tokens, model_price, price
from workers.trajectory import TrajectoryLog, cut_output
from workers.usage import RunUsage

MODEL = "openai/gpt-4o-mini"


def answer(text: str, tokens: tuple[int, int], cached: bool = False) -> Answer:
    return Answer(text=text, cached=cached, usage={"prompt_tokens": tokens[0], "completion_tokens": tokens[1]},
                  cost=price(MODEL, *tokens))


def test_litellm_prices_from_its_table() -> None:
    assert model_price(MODEL) == (1.5e-07, 6e-07)  # LiteLLM's table: $0.15 / $0.60 per million
    assert price(MODEL, 1_000_000, 0) == pytest.approx(0.15)
    assert model_price("openai/no-such-model-here") is None and price("openai/no-such-model-here", 5, 5) is None


def test_one_token_estimate_for_prompts_and_chat_messages() -> None:
    """Budgets (prompts) and the rate limiter (messages) estimate with the same function."""
    messages = [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 39}]
    assert estimate_tokens(messages) == estimate_tokens("x" * 40 + "\n" + "y" * 39) == 20
    assert estimate_tokens("") == estimate_tokens([]) == 1


def test_sub_usage_paid_vs_uncached_and_the_batch_in_flight() -> None:
    usage = RunUsage(root_model=MODEL, sub_model=MODEL)
    usage.batch_started(["a", "b", "c"], {})
    usage.chunk_arrived([answer("x", (10, 5), cached=True)])
    live = usage.progress()
    assert live.llm_calls == 1 and live.cache_hits == 1 and live.batch == Batch(total=3, done=1, cache_hits=1)
    assert live.usage.sub.calls == 0  # the batch's answers are counted once, in flight until it ends
    usage.batch_done([answer("x", (10, 5)), answer("y", (10, 5), cached=True), Answer(error="boom", worker="w1")])
    usage.resent(2)
    done = usage.progress()
    assert done.batch is None and (done.llm_calls, done.cache_hits, done.llm_errors) == (3, 1, 1)
    assert done.llm_workers == {"w1": 1} and done.subtasks_resent == 2
    sub = done.usage.sub
    assert (sub.model, sub.input_tokens, sub.paid_input_tokens) == (MODEL, 20, 10)
    one_call = price(MODEL, 10, 5)
    assert one_call is not None
    assert sub.cost_uncached == pytest.approx(2 * one_call)
    assert sub.cost_paid == pytest.approx(one_call) == pytest.approx(done.cost_usd)


def test_root_usage_from_the_lm_history_counts_cache_hits_as_free(stub_llm) -> None:
    lm = dspy.LM(MODEL, api_base=stub_llm.api_base, api_key="x")
    usage = RunUsage(root_model=MODEL, sub_model=MODEL)
    usage.watch_root(lm)
    prompt = f"hello {id(usage)}"
    lm(prompt)
    lm(prompt)  # dspy.cache hit
    root = usage.usage().root
    assert stub_llm.request_count == 1
    assert (root.calls, root.cache_hits) == (2, 1)
    served_in, served_out = stub_llm.tokens_served
    assert (root.paid_input_tokens, root.paid_output_tokens) == (served_in, served_out)
    assert root.input_tokens == 2 * served_in
    assert root.cost_uncached == pytest.approx(2 * root.cost_paid) and root.cost_paid > 0


def test_a_budget_refuses_the_batch_that_would_cross_it() -> None:
    usage = RunUsage(root_model=MODEL, sub_model=MODEL)
    budget = Budget(usage, max_cost=0.001, max_tokens=None, time_limit=None)
    usage.budget = budget
    usage.batch_started(["short prompt"] * 5, {})  # a few cents of a cent: fine
    usage.batch_done([answer("ok", (4, 2))] * 5)
    with pytest.raises(BudgetExceeded, match=r"max cost: a batch of 100 sub-call\(s\)"):
        usage.batch_started(["x" * 40_000] * 100, {})  # ~1M input tokens: $0.15
    assert budget.tripped and "max cost" in budget.tripped
    with pytest.raises(BudgetExceeded):
        budget.check_step()  # once tripped, the run stops at the next step
    tokens = Budget(RunUsage(root_model=MODEL, sub_model=MODEL), max_cost=None, max_tokens=50, time_limit=None)
    with pytest.raises(BudgetExceeded, match="max tokens"):
        tokens.check_batch(["y" * 400], {})


def test_time_limit_and_unpriced_models() -> None:
    usage = RunUsage(root_model=MODEL, sub_model="openai/stub-sub")
    budget = Budget(usage, max_cost=1.0, max_tokens=None, time_limit=0.5, started=0.0)
    assert budget.unpriced_models() == ["openai/stub-sub"]
    with pytest.raises(BudgetExceeded, match="time limit"):
        budget.check_time()


def test_budget_settings_are_run_options_checked_like_the_rest() -> None:
    settings = with_options(Settings(), {"max_cost": "0.5", "max_tokens": 1000, "time_limit": 60})
    assert (settings.max_cost, settings.max_tokens, settings.time_limit) == (0.5, 1000, 60.0)
    with pytest.raises(SettingsError, match="max_cost"):
        with_options(Settings(), {"max_cost": "-1"})


def test_trajectory_entries_are_appended_and_cut_with_the_cut_stated(redis_client) -> None:
    usage = RunUsage(root_model=MODEL, sub_model=MODEL)
    log = TrajectoryLog(redis_client, "run1", usage)
    log.begin()
    usage.batch_done([answer("x", (10, 5)), answer("x", (10, 5), cached=True)])
    log.end({"reasoning": "look", "code": "print('x' * 50000)", "output": "x" * 50_000})
    log.begin()
    log.end({"reasoning": "done", "code": "SUBMIT(a=1)", "output": "FINAL: {'a': 1}"}, final=True)
    steps = read_trajectory(redis_client, "run1")
    assert [s["step"] for s in steps] == [1, 2] and steps[1]["final"]
    assert steps[0]["output_chars"] == 50_000 and steps[0]["output_cut"] == 30_000
    assert "30,000 characters cut from the trace" in steps[0]["output"]
    assert (steps[0]["sub"]["calls"], steps[0]["sub"]["cache_hits"], steps[1]["sub"]["calls"]) == (2, 1, 0)
    assert cut_output("short") == ("short", 0)
    record = RunRecord(spec=RunSpec(run_id="run1", signature="a -> b", inputs={}), status=RunStatus.SUCCEEDED)
    text = format_trace(record, steps)
    assert text.index("print('x' * 50000)") < text.index("SUBMIT(a=1)") and "── step 2 (code, final)" in text
    assert "sub-calls 2 (1 cached, 0 errors" in text and "usage: no LM call yet" in text
    colored = format_trace(record, steps, color=True)
    assert "\x1b[" in colored  # Pygments highlighted the code


def test_flower_sees_the_signature_and_sizes_never_the_data() -> None:
    spec = RunSpec(run_id="r1", signature="chapters: list[str], task: str -> answer: str",
                   inputs={"chapters": "d1", "task": "d2"}, options={"max_iters": 5})
    secret = ["the secret chapter text"] * 117
    reprs = task_reprs(spec, {"chapters": describe_value(secret), "task": describe_value("rate them")})
    assert reprs["argsrepr"] == repr(spec.signature)
    assert "'chapters': 'list[117], 3.2 KB'" in reprs["kwargsrepr"] and "'max_iters': 5" in reprs["kwargsrepr"]
    assert "secret" not in reprs["kwargsrepr"] + reprs["argsrepr"]
    child = RunSpec(run_id="r1.0", signature="task: str, context -> answer: str", inputs={"task": "d3", "context": "d4"},
                    parent="r1", root="r1", depth=1)
    assert "'parent': 'r1'" in task_reprs(child, {})["kwargsrepr"]  # Flower shows whose child a run is


def test_progress_is_one_typed_document_with_the_documented_wire_shape() -> None:
    usage = Usage(root=CallUsage(model=MODEL, calls=2, cache_hits=1, input_tokens=30, paid_input_tokens=15,
                                 cost_paid=0.01, cost_uncached=0.02),
                  sub=CallUsage(model="openai/stub-sub", calls=100, cache_hits=6, errors=1, cost_paid=0.0023,
                                cost_uncached=0.03, unpriced_calls=0))
    progress = Progress(iteration=2, max_iters=10, elapsed=12.5, usage=usage, llm_workers={"llmA@h": 120},
                        batch=Batch(total=500, done=20, cache_hits=1),
                        sandbox=RunSandbox(backend="local", id="rlmq-abc", isolation="process"))
    assert (progress.llm_calls, progress.cache_hits, progress.cost_usd) == (120, 7, pytest.approx(0.0123))
    assert summary_line(progress) == ("iteration 2/10 · batch 20/500 (1 cached) · sub-calls 120 · cache hits 7 · "
                                      "$0.0123 paid ($0.0500 uncached)")

    # The JSON that readers had before the types (README: result["usage"]["total"]; status --json; Celery meta)
    wire = progress.to_json_dict()
    assert wire["usage"]["total"] == {"calls": 102, "cache_hits": 7, "errors": 1, "input_tokens": 30,
                                      "output_tokens": 0, "paid_input_tokens": 15, "paid_output_tokens": 0,
                                      "cost_paid": 0.0123,
                                      "cost_uncached": 0.05, "unpriced_calls": 0, "seconds": 0.0, "priced": True}
    assert wire["usage"]["root"]["model"] == MODEL and wire["llm_calls"] == 120 and wire["batch"]["done"] == 20
    assert wire["sandbox"] == {"backend": "local", "id": "rlmq-abc", "isolation": "process"}
    assert Progress.from_json_dict(wire) == progress
    assert Progress.from_json_dict({"iteration": 1}) == Progress(iteration=1)  # a record from an older version

    record = RunRecord(spec=RunSpec(run_id="r1", signature="a -> b", inputs={}), status=RunStatus.RUNNING,
                       started_at=1.0, progress=progress)
    line = format_progress(record, clock=False)
    assert line.startswith("running · iteration 2/10 · batch 20/500 (1 cached) · sub-LLM calls 120 · cache hits 7 · "
                           "15 tokens paid · $0.0123 paid / $0.0500 uncached · sandbox rlmq-abc (local, process)")
    assert "no security boundary" in line
    again = RunRecord.from_hash({b"spec": record.spec.to_json().encode(), b"status": b"RUNNING",
                                 b"progress": json.dumps(wire).encode()})
    assert again.progress == progress and json.loads(again.to_json())["progress"] == wire
    assert "tokens paid" not in format_progress(RunRecord(spec=record.spec, status=RunStatus.QUEUED))
