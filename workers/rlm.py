"""``dspy.RLM`` on the fleet: sandbox code's sub-LLM calls fan out over the ``llm`` queue, and each
step is budgeted and recorded.

``FleetRLM`` replaces one private hook of DSPy 3.4, ``_make_llm_tools(budget, max_workers)``
(``workers.dspy_private``): ``llm_query_batched`` reserves the whole batch against ``max_llm_calls``
up front (DSPy's semantics) and sends it through :class:`~workers.fanout.Fanout`; ``llm_query`` takes
the same path with one prompt; a failed prompt is an ``[ERROR] ...`` string. Its ``sub_lm`` is
:class:`~workers.engines.FleetLM`, so sub-agents built by sandbox code (``dspy.Predict(...)`` via
DSPy's facade, which charges the budget itself) are cached, rate limited and spread over the fleet too.

``TracedRLM`` wraps DSPy 3.4.1's per-iteration hooks (``_execute_iteration``, ``_execute_code``,
``_extract_fallback``; ``tests/test_dspy_contract.py`` fails if their signatures change): before
each step it asks the run's budget, after it the step goes to the run's ``TrajectoryLog``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import dspy
from dspy.primitives.prediction import Prediction
from dspy.primitives.repl_types import REPLVariable

from workers.children import Children, check_request, prompt_of
from workers.dspy_private import LLMCallBudget
from workers.engines import FleetLM
from workers.fanout import Fanout
from workers.repl_preview import repl_variable
from workers.tracing import NULL_SPANS, RunSpans
from workers.trajectory import TrajectoryLog

__all__ = ["FleetRLM", "TracedRLM", "make_llm_tools", "make_rlm_tools"]


def make_llm_tools(fanout: Fanout, budget: LLMCallBudget,
                   tree_reserve: Callable[[int], None] | None = None) -> dict[str, Callable[..., Any]]:
    """``llm_query`` / ``llm_query_batched`` for sandbox code, charged to ``budget`` (and to the run's tree:
    ``tree_reserve``)."""

    def reserve(n: int) -> None:
        budget.reserve(n)
        if tree_reserve is not None:
            tree_reserve(n)

    def llm_query(prompt: str) -> str:
        """Query the LLM with a prompt string."""
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        reserve(1)
        return fanout.query([prompt])[0].for_sandbox()

    def llm_query_batched(prompts: list[str]) -> list[str]:
        """Query prompts concurrently; a failed prompt comes back as an '[ERROR] ...' string."""
        if not prompts:
            return []
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("llm_query_batched takes a list of prompt strings")
        reserve(len(prompts))  # the whole batch up front, as DSPy does
        return [a.for_sandbox() for a in fanout.query(prompts)]

    return {"llm_query": llm_query, "llm_query_batched": llm_query_batched}


def make_rlm_tools(children: Children | None, llm_tools: dict[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """``rlm_query`` / ``rlm_query_batched``: child runs through ``children``, or, at the tree's deepest
    level (``children`` None), the same requests answered as ``llm_query`` prompts."""

    def rlm_query_batched(tasks: list[str], contexts: list[Any] | None = None) -> list[str]:
        """Start a child RLM run per task (with its context) across the fleet; their answers, in order."""
        if isinstance(tasks, list) and not tasks:
            return []
        checked = check_request(tasks, contexts)
        if children is None:
            return list(llm_tools["llm_query_batched"]([prompt_of(t, c) for t, c in zip(tasks, checked, strict=True)]))
        return children.query(tasks, checked)

    def rlm_query(task: str, context: Any = None) -> str:
        """Start a child RLM run on ``task`` with ``context`` (any JSON value) and return its answer."""
        return rlm_query_batched([task], [context])[0]

    return {"rlm_query": rlm_query, "rlm_query_batched": rlm_query_batched}


class FleetRLM(dspy.RLM):
    """``dspy.RLM`` whose sub-LLM calls (tools and sub-agents) go through the Celery fleet.

    ``rlm_tools``: whether sandbox code gets ``rlm_query[_batched]`` (``children`` None: answered as
    ``llm_query``, the tree's deepest level)."""

    def __init__(self, signature: Any, *, fanout: Fanout, rlm_tools: bool = False, children: Children | None = None,
                 tree_reserve: Callable[[int], None] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("sub_lm", FleetLM(fanout))
        super().__init__(signature, **kwargs)
        self.fanout = fanout
        self.rlm_tools, self.children, self.tree_reserve = rlm_tools, children, tree_reserve

    def _build_variables(self, **input_args: Any) -> list[REPLVariable]:
        # DSPy's own dumps each input whole to describe it (length, preview): seconds for a large corpus
        plain = {name: v for name, v in input_args.items() if type(v) in (list, dict)}
        built = {v.name: v for v in super()._build_variables(**{n: v for n, v in input_args.items() if n not in plain})}
        built.update({name: repl_variable(name, value, self.signature.input_fields.get(name))
                      for name, value in plain.items()})
        return [built[name] for name in input_args]

    def _make_llm_tools(self, budget: LLMCallBudget | None = None, max_workers: int = 8) -> dict[str, Callable]:
        # max_workers is DSPy's thread count for its own batch; the fleet's width replaces it.
        tools = make_llm_tools(self.fanout, budget if budget is not None else LLMCallBudget(self.max_llm_calls),
                               self.tree_reserve)
        if self.rlm_tools:
            tools.update(make_rlm_tools(self.children, tools))
        return tools


class TracedRLM(FleetRLM):
    """``FleetRLM`` that checks the budget before each step and records each step as it ends."""

    def __init__(self, signature: Any, *, trace: TrajectoryLog, budget: Any,
                 on_code: Callable[[], None] | None = None, spans: RunSpans = NULL_SPANS, **kwargs: Any) -> None:
        super().__init__(signature, **kwargs)
        self.trace = trace
        self.spans = spans  # the run's OpenTelemetry spans (workers.tracing): a span per step and its code
        self.budget = budget  # workers.budget.Budget
        self.on_code = on_code  # called when a step's code starts (the root call is then accounted)

    def _execute_iteration(self, repl: Any, variables: Any, history: Any, iteration: int,
                           *args: Any, **kwargs: Any) -> Any:
        self.budget.check_step()  # BudgetExceeded ends the run before the root LM is paid
        self.trace.begin()
        with self.spans.iteration(iteration + 1):
            result = super()._execute_iteration(repl, variables, history, iteration, *args, **kwargs)
        if isinstance(result, Prediction):
            self.trace.end((result.trajectory or [{}])[-1], final=True)
        elif getattr(result, "entries", None):
            self.trace.end(result.entries[-1])
        return result

    def _execute_code(self, repl: Any, code: str, input_args: dict[str, Any]) -> Any:
        if self.on_code is not None:
            self.on_code()
        started = time.monotonic()
        try:
            with self.spans.code():
                return super()._execute_code(repl, code, input_args)
        finally:
            self.trace.exec_seconds += time.monotonic() - started

    def _extract_fallback(self, variables: Any, history: Any, output_field_names: list[str]) -> Prediction:
        self.budget.check_step()
        self.trace.begin()
        prediction = super()._extract_fallback(variables, history, output_field_names)
        outputs = {name: getattr(prediction, name, None) for name in output_field_names}
        self.trace.end({"reasoning": "max_iters reached: DSPy's extract step produced the outputs",
                        "code": "", "output": f"FINAL (extracted): {outputs}"}, kind="extract", final=True)
        return prediction
