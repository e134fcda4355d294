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
