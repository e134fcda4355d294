"""Usage accounting, prices, budgets and the views' formatting, without a fleet: real objects, real Redis
where a key is written, a real ``dspy.LM`` against the stub for the root-LM history."""

from __future__ import annotations

import dspy
import pytest

from rlmq.store.records import RunRecord, RunSpec, RunStatus
from rlmq.run_options import with_options
from rlmq.settings import Settings, SettingsError
from rlmq.flower_repr import describe_value, task_reprs
from rlmq.trace import format_trace, read_trajectory
from workers.budget import Budget, BudgetExceeded
from workers.answer import Answer
from workers.monitor import one_line, summary_line
from workers.pricing import model_price, price
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


def test_sub_usage_paid_vs_uncached_and_the_batch_in_flight() -> None:
    usage = RunUsage(root_model=MODEL, sub_model=MODEL)
    usage.batch_started(["a", "b", "c"], {})
    usage.chunk_arrived([answer("x", (10, 5))])
    live = usage.snapshot()
    assert live["llm_calls"] == 1 and live["batch"] == {"done": 1, "total": 3, "cache_hits": 0}
    usage.add([answer("x", (10, 5)), answer("y", (10, 5), cached=True), Answer(error="boom")])
    done = usage.snapshot()
    assert done["batch"] is None and done["llm_calls"] == 3 and done["cache_hits"] == 1 and done["llm_errors"] == 1
    sub = done["usage"]["sub"]
    assert (sub["input_tokens"], sub["paid_input_tokens"]) == (20, 10)
    assert sub["cost_uncached"] == pytest.approx(2 * price(MODEL, 10, 5))
    assert sub["cost_paid"] == pytest.approx(price(MODEL, 10, 5))


def test_root_usage_from_the_lm_history_counts_cache_hits_as_free(stub_llm) -> None:
    lm = dspy.LM(MODEL, api_base=stub_llm.api_base, api_key="x")
    usage = RunUsage(root_model=MODEL, sub_model=MODEL)
    usage.watch_root(lm)
    prompt = f"hello {id(usage)}"
    lm(prompt)
    lm(prompt)  # dspy.cache hit
    root = usage.usage()["root"]
    assert stub_llm.request_count == 1
    assert (root["calls"], root["cache_hits"]) == (2, 1)
    served_in, served_out = stub_llm.tokens_served
    assert (root["paid_input_tokens"], root["paid_output_tokens"]) == (served_in, served_out)
    assert root["input_tokens"] == 2 * served_in
    assert root["cost_uncached"] == pytest.approx(2 * root["cost_paid"]) and root["cost_paid"] > 0


def test_a_budget_refuses_the_batch_that_would_cross_it() -> None:
    usage = RunUsage(root_model=MODEL, sub_model=MODEL)
    budget = Budget(usage, max_cost=0.001, max_tokens=None, time_limit=None)
    usage.budget = budget
    usage.batch_started(["short prompt"] * 5, {})  # a few cents of a cent: fine
    usage.add([answer("ok", (4, 2))] * 5)
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
    log.end({"reasoning": "look", "code": "print('x' * 50000)", "output": "x" * 50_000})
    log.begin()
    log.end({"reasoning": "done", "code": "SUBMIT(a=1)", "output": "FINAL: {'a': 1}"}, final=True)
    steps = read_trajectory(redis_client, "run1")
    assert [s["step"] for s in steps] == [1, 2] and steps[1]["final"]
    assert steps[0]["output_chars"] == 50_000 and steps[0]["output_cut"] == 30_000
    assert "30,000 characters cut from the trace" in steps[0]["output"]
    assert cut_output("short") == ("short", 0)
    record = RunRecord(spec=RunSpec(run_id="run1", signature="a -> b", inputs={}), status=RunStatus.SUCCEEDED)
    text = format_trace(record, steps)
    assert text.index("print('x' * 50000)") < text.index("SUBMIT(a=1)") and "── step 2 (code, final)" in text
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


def test_progress_summary_and_one_line_errors() -> None:
    meta = {"iteration": 2, "max_iters": 10, "llm_calls": 120, "cache_hits": 7,
            "batch": {"done": 120, "total": 500, "cache_hits": 7},
            "usage": {"total": {"cost_paid": 0.0123, "cost_uncached": 0.05}}}
    line = summary_line(meta)
    assert line == ("iteration 2/10 · batch 120/500 (7 cached) · sub-calls 120 · cache hits 7 · "
                    "$0.0123 paid ($0.0500 uncached)")
    assert one_line("Traceback:\n  File x\nValueError: bad\n") == "Traceback: | File x | ValueError: bad"
