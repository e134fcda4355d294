"""DSPy's private surface that rlmq depends on (all of it is in ``workers.dspy_private``); a DSPy
upgrade that changes any of it fails here first."""

from __future__ import annotations

import inspect

import dspy
import pytest
from dspy.clients.cache import Cache
from dspy.utils import DummyLM

from rlmq.settings import Settings
from workers import dspy_private
from workers.dspy_private import LLMCallBudget, action_predictor, iteration_of, use_as_disk_tier
from workers.engines import FleetLM
from workers.fanout import Fanout
from workers.repl_preview import repl_variable
from workers.rlm import FleetRLM


def test_make_llm_tools_signature_is_what_fleet_rlm_overrides() -> None:
    params = inspect.signature(getattr(dspy.RLM, dspy_private.TOOLS_HOOK)).parameters
    assert list(params) == ["self", "budget", "max_workers"]
    assert params["budget"].default is None and params["max_workers"].default == 8
    assert list(inspect.signature(FleetRLM._make_llm_tools).parameters) == list(params)


def test_rlm_builds_its_tools_through_the_hook_with_the_run_budget() -> None:
    fanout = Fanout(Settings(redis_url="redis://127.0.0.1:1/0", lm="openai/x"), app=None)
    rlm = FleetRLM("context -> answer", fanout=fanout, max_llm_calls=3)
    budget = LLMCallBudget(3)
    tools = rlm._prepare_execution_tools(budget)
    for name in ("llm_query", "llm_query_batched"):
        assert "make_llm_tools" in tools[name].__qualname__, tools[name].__qualname__
    # the batch is reserved before anything is dispatched (no broker needed to see it refused)
    with pytest.raises(RuntimeError, match="LLM call limit exceeded"):
        tools["llm_query_batched"](["a", "b", "c", "d"])
    assert isinstance(rlm.sub_lm, FleetLM)  # what DSPy's sandbox facade builds sub-agents on


def test_llm_call_budget_semantics() -> None:
    budget = LLMCallBudget(2)
    budget.reserve(2)
    with pytest.raises(RuntimeError):
        budget.reserve(1)
    assert "budget" in inspect.signature(dspy.RLM._prepare_execution_tools).parameters


def test_action_predictor_is_called_once_per_iteration_with_k_of_max() -> None:
    """A real RLM run (local sandbox, DummyLM as the root): the callback sees "1/3", "2/3"."""
    from dspy.utils.callback import BaseCallback

    from broker_bridge import interpreter_factory

    rlm = dspy.RLM("question -> answer", max_iters=3, interpreter_factory=interpreter_factory("local"))
    seen: list[int | None] = []

    class Spy(BaseCallback):
        def on_module_start(self, call_id, instance, inputs):
            if instance is action_predictor(rlm):
                seen.append(iteration_of(inputs))

    lm = DummyLM([{"reasoning": "look", "code": "print(question)"},
                  {"reasoning": "done", "code": "SUBMIT(answer='42')"}])
    with dspy.context(lm=lm, callbacks=[Spy()]):
        assert rlm(question="six times seven?").answer == "42"
    assert seen == [1, 2]


def test_iteration_parsing() -> None:
    assert iteration_of({"iteration": "3/20"}) == 3
    assert iteration_of({"kwargs": {"iteration": "12/40"}}) == 12
    assert iteration_of({"iteration": ""}) is None


def test_cache_reaches_its_disk_tier_through_the_replaced_attributes() -> None:
    class Tier(dict):
        def set(self, key, value):
            self[key] = value

        def delete(self, key):
            self.pop(key, None)

    cache = Cache(enable_disk_cache=False, enable_memory_cache=False, disk_cache_dir=None)
    tier = Tier()
    use_as_disk_tier(cache, tier)
    request = {"model": "openai/x", "messages": [{"role": "user", "content": "hi"}]}
    cache.put(request, {"answer": 1})
    assert len(tier) == 1, "Cache.put did not write to the replaced disk tier"
    assert cache.get(request) == {"answer": 1}
    tier.clear()
    assert cache.get(request) is None, "Cache.get did not read the replaced disk tier"


def test_per_step_hooks_that_traced_rlm_wraps() -> None:
    """``workers.rlm.TracedRLM`` wraps these three to record and budget each step."""
    from workers.rlm import TracedRLM

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


_CORPUS = [f"document {i}: \"quoted\", caf\u00e9 \u2014 line\nbreak \\ tab\t" for i in range(300)]


@pytest.mark.parametrize("value", [
    _CORPUS,  # a corpus: truncated preview, head and tail
    ["short", "list"],  # not truncated
    [],
    {},
    {"a": 1, "b": [1.5, -2, True, False, None], "c": {"nested": ["x"] * 200, "empty": [], "e": {}}},
    [{"id": i, "text": "t" * (i % 7), "tags": ["a", "b"][: i % 3], "score": i / 3} for i in range(400)],
    {f"key {i} \u00fc": {"v": [i, str(i)]} for i in range(500)},  # a dict corpus: its tail from its last items
    [[1, [2, [3, [4, []]]]]] * 100,  # nesting at the tail
    [10**30, -0.0, 1e-7, 3.0] * 300,
    ["x" * 5000],  # one huge item: the tail is inside it
    [1, 2, float("nan")],  # not plain JSON: DSPy's path
    {1: "int key"},  # not plain JSON: DSPy's path
    "a plain string",  # not a container: DSPy's path
    ("a", "tuple"),
])
def test_a_variable_described_without_dumping_it_is_dspys_description(value) -> None:
    """RLM describes each input to the root LM by REPLVariable.from_value (length and a preview of the
    indented JSON dump); rlmq's repl_variable computes it without the dump (FleetRLM._build_variables),
    and must say exactly the same."""
    field = dspy.InputField(desc="the documents")
    expected = dspy.primitives.repl_types.REPLVariable.from_value("docs", value, field_info=field)
    assert repl_variable("docs", value, field) == expected


def test_fleet_rlm_builds_its_variables_through_repl_variable() -> None:
    rlm = FleetRLM("docs: list[str], question: str -> answer: str", fanout=Fanout(Settings(redis_url="redis://127.0.0.1:1/0", lm="openai/x"), app=None))
    built = rlm._build_variables(docs=_CORPUS, question="Who?")
    assert [v.name for v in built] == ["docs", "question"]
    assert built == [dspy.primitives.repl_types.REPLVariable.from_value(
        n, v, field_info=rlm.signature.input_fields[n]) for n, v in (("docs", _CORPUS), ("question", "Who?"))]
