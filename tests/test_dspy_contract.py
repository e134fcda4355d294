"""DSPy's private surface that rlmq depends on; a DSPy upgrade that changes it fails here first.

``workers.fanout.FleetRLM`` overrides ``RLM._make_llm_tools(budget, max_workers)`` (its signature
changed between 3.3 and 3.4) and uses ``dspy.predict.rlm._LLMCallBudget``.
"""

from __future__ import annotations

import inspect

import dspy
import pytest
from dspy.predict.rlm import _LLMCallBudget

from workers.fanout import Fanout, FleetLM, FleetRLM
from rlmq.settings import Settings


def test_make_llm_tools_signature_is_what_fleet_rlm_overrides() -> None:
    params = inspect.signature(dspy.RLM._make_llm_tools).parameters
    assert list(params) == ["self", "budget", "max_workers"]
    assert params["budget"].default is None and params["max_workers"].default == 8
    assert list(inspect.signature(FleetRLM._make_llm_tools).parameters) == list(params)


def test_rlm_builds_its_tools_through_the_hook_with_the_run_budget() -> None:
    fanout = Fanout(Settings(redis_url="redis://127.0.0.1:1/0", lm="openai/x"), app=None)
    rlm = FleetRLM("context -> answer", fanout=fanout, max_llm_calls=3)
    budget = _LLMCallBudget(3)
    tools = rlm._prepare_execution_tools(budget)
    for name in ("llm_query", "llm_query_batched"):
        assert "make_llm_tools" in tools[name].__qualname__, tools[name].__qualname__
    # the batch is reserved before anything is dispatched (no broker needed to see it refused)
    with pytest.raises(RuntimeError, match="LLM call limit exceeded"):
        tools["llm_query_batched"](["a", "b", "c", "d"])
    assert isinstance(rlm.sub_lm, FleetLM)  # what DSPy's sandbox facade builds sub-agents on


def test_llm_call_budget_semantics() -> None:
    budget = _LLMCallBudget(2)
    budget.reserve(2)
    with pytest.raises(RuntimeError):
        budget.reserve(1)
    assert "budget" in inspect.signature(dspy.RLM._prepare_execution_tools).parameters


def test_per_step_hooks_that_traced_rlm_wraps() -> None:
    """``workers.trajectory.TracedRLM`` wraps these three to record and budget each step."""
    from workers.trajectory import TracedRLM

    assert list(inspect.signature(dspy.RLM._execute_iteration).parameters)[:5] == [
        "self", "repl", "variables", "history", "iteration"]
    assert list(inspect.signature(dspy.RLM._execute_code).parameters) == ["self", "repl", "code", "input_args"]
    assert list(inspect.signature(dspy.RLM._extract_fallback).parameters) == [
        "self", "variables", "history", "output_field_names"]
    for name in ("_execute_iteration", "_execute_code", "_extract_fallback"):
        assert getattr(TracedRLM, name) is not getattr(dspy.RLM, name)
    # DSPy's history entries carry what the trace records
    from dspy.primitives.repl_types import REPLEntry

    assert {"reasoning", "code", "output"} <= set(REPLEntry.model_fields)
