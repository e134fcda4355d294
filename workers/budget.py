"""A run's budgets: dollars (``max_cost``), tokens (``max_tokens``) and wall clock (``time_limit``).

Checked *before* money is spent: before each root-LM step (with the previous step's size as the
estimate of the next) and before each fan-out batch is sent (its input tokens estimated from the
prompts' lengths, its output from what this run's sub-calls returned so far, priced with LiteLLM's
table). A batch that would cross the line is refused whole, so it is never paid for; the tool
call raises :class:`BudgetExceeded` in sandbox code, and the run stops at the next step boundary
(or at once for the wall clock, whose tick deletes the sandbox) with status STOPPED and the
reason. ``max_llm_calls`` stays DSPy's own count of sub-calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from workers.llm_call import Messages
from workers.pricing import estimate_tokens, model_price, price
from workers.usage import RunUsage

__all__ = ["Budget", "BudgetExceeded"]

_DEFAULT_OUTPUT_TOKENS = 64  # a sub-call's answer before this run has seen one


class BudgetExceeded(Exception):
    """A budget of the run would be (or was) exceeded; the message says which and by how much."""


class Budget:
    def __init__(self, usage: RunUsage, *, max_cost: float | None, max_tokens: int | None,
                 time_limit: float | None, started: float | None = None,
                 worker_time_limit: float | None = None) -> None:
        self.usage = usage
        self.max_cost = max_cost
        self.max_tokens = max_tokens
        # The run's own wall-clock budget, or the workers' cap on every run (RLMQ_RUN_TIME_LIMIT), whichever
        # is shorter: the engine enforces both in any Celery pool (Celery's time limits need prefork).
        self.time_limit = time_limit
        self._time_limit_source = ""
        if worker_time_limit is not None and (time_limit is None or worker_time_limit < time_limit):
            self.time_limit, self._time_limit_source = worker_time_limit, " (the workers' RLMQ_RUN_TIME_LIMIT)"
        self.started = time.monotonic() if started is None else started
        self._lock = threading.Lock()
        self.tripped: str | None = None  # the reason, once a budget refused something
        # In a tree of runs (workers.tree_budget): the tree's reason once it stopped, and where a trip is recorded
        self.tree_stopped: Callable[[], str | None] | None = None
        self.on_trip: Callable[[str], str] | None = None
        self.tree_charge: Callable[..., tuple[str, float, int]] | None = None  # TreeBudget.charge
        self.tree_step: Callable[[int, int], tuple[int, int]] | None = None  # TreeBudget.step_size

    @property
    def limited(self) -> bool:
        """Whether a sub-call batch must be priced before it is sent (a dollar or token budget)."""
        return self.max_cost is not None or self.max_tokens is not None

    def unpriced_models(self) -> list[str]:
        """Models a dollar budget cannot be enforced for (LiteLLM's table has no price)."""
        if self.max_cost is None:
            return []
        models = {self.usage.root_model, self.usage.sub_model}
        return sorted(m for m in models if model_price(m) is None)

    def trip(self, reason: str) -> BudgetExceeded:
        if self.tripped is None and self.on_trip is not None:
            reason = self.on_trip(reason)  # the tree's first reason is every node's
        with self._lock:
            if self.tripped is None:
                self.tripped = reason
        return BudgetExceeded(self.tripped)

    def check_tree(self) -> None:
        """BudgetExceeded once the run's tree has stopped (any node met a limit)."""
        reason = self.tree_stopped() if self.tree_stopped is not None else None
        if reason is not None:
            raise self.trip(reason)

    def check_time(self) -> None:
        if self.time_limit is not None:
            elapsed = time.monotonic() - self.started
            if elapsed > self.time_limit:
                raise self.trip(f"time limit: the run has run {elapsed:.1f}s of its {self.time_limit:g}s"
                                f"{self._time_limit_source}")

    def _check(self, what: str, cost: float, tokens: int) -> None:
        if self.tripped is not None:
            raise BudgetExceeded(self.tripped)
        self.check_tree()
        self.check_time()
        if self.max_cost is None and self.max_tokens is None:
            return
        paid_cost, paid_tokens = self.usage.paid()
        over: str | None = None
        if self.tree_charge is not None:  # a tree's max_cost / max_tokens: every node's spend and calls in flight
            over, paid_cost, paid_tokens = self.tree_charge(paid_cost, paid_tokens, estimate=(cost, tokens),
                                                            max_cost=self.max_cost, max_tokens=self.max_tokens)
        elif self.max_cost is not None and paid_cost + cost > self.max_cost:
            over = "cost"
        elif self.max_tokens is not None and paid_tokens + tokens > self.max_tokens:
            over = "tokens"
        if over == "cost":
            raise self.trip(f"max cost: {what} (~${cost:.6f} estimated) would bring the run from "
                            f"${paid_cost:.6f} past its ${self.max_cost:g} budget")
        if over == "tokens":
            raise self.trip(f"max tokens: {what} (~{tokens} tokens estimated) would bring the run from "
                            f"{paid_tokens} past its {self.max_tokens} token budget")

    def check_step(self) -> None:
        """Before a root-LM step: the previous step's size estimates this one (the prompt only grows)."""
        tokens_in, tokens_out = self.usage.last_root_call
        if self.tree_step is not None:  # a child's first step: the tree's last step estimates it
            tokens_in, tokens_out = self.tree_step(tokens_in, tokens_out)
        cost = price(self.usage.root_model, tokens_in, tokens_out) or 0.0
        self._check("the next root-LM step", cost, tokens_in + tokens_out)

    def check_batch(self, prompts: Sequence[str | Messages], params: dict[str, Any]) -> None:
        """Before a batch of sub-calls is sent; raises BudgetExceeded to refuse it whole."""
        if self.tripped is None and not self.limited:  # nothing to price: only the tree and the clock
            self.check_tree()
            self.check_time()
            return
        tokens_in = sum(estimate_tokens(p) for p in prompts)
        sub = self.usage.usage().sub
        per_answer = (sub.output_tokens // sub.calls) if sub.calls else _DEFAULT_OUTPUT_TOKENS
        per_answer = int(params.get("max_tokens") or max(1, per_answer))
        tokens_out = per_answer * len(prompts)
        cost = price(self.usage.sub_model, tokens_in, tokens_out) or 0.0
        self._check(f"a batch of {len(prompts)} sub-call(s)", cost, tokens_in + tokens_out)
