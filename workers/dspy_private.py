"""Every private piece of DSPy 3.4 that rlmq relies on, in one place.

DSPy pins none of these; ``tests/test_dspy_contract.py`` checks each one, so an upgrade that
changes them fails there first (and ``pyproject.toml`` pins dspy to a minor version):

1. ``RLM._make_llm_tools(budget, max_workers)``: the hook ``FleetRLM`` overrides so that
   ``llm_query``/``llm_query_batched`` go through the fleet (its signature changed in 3.4).
2. ``dspy.predict.rlm._LLMCallBudget``: the run's ``max_llm_calls`` counter those tools charge.
3. ``RLM.generate_action``: the predictor called once per iteration, with an ``iteration``
   input written ``"k/max"``; the run's progress reads it.
4. ``Cache.enable_disk_cache`` / ``Cache.disk_cache``: the attributes through which
   ``dspy.clients.cache.Cache`` reaches its disk tier, which rlmq replaces with Redis.
5. ``RLM._execute_iteration(repl, variables, history, iteration, ...)``, ``RLM._execute_code(repl,
   code, input_args)``, ``RLM._extract_fallback(variables, history, output_field_names)`` and the
   fields of ``dspy.primitives.repl_types.REPLEntry`` (reasoning, code, output): what
   ``workers.rlm.TracedRLM`` wraps to budget each step and record it as it ends.
6. ``RLM._build_variables(**input_args)`` and what ``REPLVariable.from_value`` writes (the length and
   head-and-tail preview of the indented JSON dump): ``FleetRLM`` builds the same description of a large
   input without the dump (``workers.repl_preview``; the contract test compares the two).
"""

from __future__ import annotations

from typing import Any

from dspy.predict.rlm import _LLMCallBudget as LLMCallBudget

__all__ = ["TOOLS_HOOK", "LLMCallBudget", "action_predictor", "iteration_of", "use_as_disk_tier"]

TOOLS_HOOK = "_make_llm_tools"  # the name FleetRLM overrides


def action_predictor(rlm: Any) -> Any:
    """The predictor an RLM calls once per iteration."""
    return rlm.generate_action


def iteration_of(predictor_inputs: dict[str, Any]) -> int | None:
    """The 1-based iteration number from the action predictor's inputs (``"3/20"`` -> 3)."""
    raw = str((predictor_inputs.get("kwargs") or predictor_inputs).get("iteration", ""))
    head = raw.split("/", 1)[0].strip()
    return int(head) if head.isdigit() else None


def use_as_disk_tier(cache: Any, tier: Any) -> None:
    """Make ``tier`` (get/set/delete/__contains__) the disk tier of a ``dspy.clients.cache.Cache``."""
    cache.enable_disk_cache = True
    cache.disk_cache = tier
