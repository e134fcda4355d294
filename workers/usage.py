"""What one run used: root-LM and sub-LLM calls, tokens, cache hits, dollars paid and uncached.

``RunUsage`` is the run's :class:`~workers.fanout.FanoutStats` (the fan-out feeds it every
answer) plus the root LM's calls, read from the ``dspy.LM`` history: an entry whose ``usage`` is
empty while its response carries token counts was a ``dspy.cache`` hit (DSPy drops the billed
usage of a hit but keeps the response). Two prices per group, from LiteLLM's table
(:mod:`workers.pricing`):

- **paid**: what the provider billed for this run (cache hits cost nothing);
- **uncached**: what the same calls would have cost without the cache.

It also tracks the fan-out batch in flight (``batch_started`` / ``chunk_arrived``, called by
:class:`~workers.fanout.Fanout` as each sub-task's answers arrive), so progress shows done/total
and cache hits while a 500-prompt batch runs, and lets a :class:`~workers.budget.Budget` refuse
a batch before it is sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.fanout import FanoutStats
from workers.answer import Answer
from workers.pricing import price

__all__ = ["CallGroup", "RunUsage"]


@dataclass
class CallGroup:
    """Counters of one kind of LM call (root or sub)."""

    calls: int = 0
    cache_hits: int = 0
    errors: int = 0
    input_tokens: int = 0  # every call's tokens, cached or not (what it would be without the cache)
    output_tokens: int = 0
    paid_input_tokens: int = 0
    paid_output_tokens: int = 0
    cost_paid: float = 0.0
    cost_uncached: float = 0.0
    unpriced_calls: int = 0  # calls whose model LiteLLM's table does not price
    seconds: float = 0.0  # wall time spent waiting for these calls

    def add(self, *, input_tokens: int, output_tokens: int, cost: float | None, cached: bool, ok: bool = True) -> None:
        self.calls += 1
        self.errors += 0 if ok else 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        if cost is None and (input_tokens or output_tokens):
            self.unpriced_calls += 1
        self.cost_uncached += cost or 0.0
        if cached:
            self.cache_hits += 1
            return
        self.paid_input_tokens += input_tokens
        self.paid_output_tokens += output_tokens
        self.cost_paid += cost or 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "cache_hits": self.cache_hits, "errors": self.errors,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "paid_input_tokens": self.paid_input_tokens, "paid_output_tokens": self.paid_output_tokens,
                "cost_paid": round(self.cost_paid, 8), "cost_uncached": round(self.cost_uncached, 8),
                "unpriced_calls": self.unpriced_calls, "seconds": round(self.seconds, 3)}

    def minus(self, before: dict[str, Any]) -> dict[str, Any]:
        now = self.as_dict()
        return {k: (round(v - before.get(k, 0), 8) if isinstance(v, float) else v - before.get(k, 0))
                for k, v in now.items()}


@dataclass
class _Batch:
    total: int
    done: int = 0
    cache_hits: int = 0
    started: float = field(default_factory=time.monotonic)


class RunUsage(FanoutStats):
    """The run's usage; thread-safe (tool threads, the run thread and the progress tick all touch it)."""

    def __init__(self, *, root_model: str, sub_model: str) -> None:
        super().__init__()
        self.root_model = root_model
        self.sub_model = sub_model
        self.root = CallGroup()
        self.sub = CallGroup()
        self.budget: Any = None  # a workers.budget.Budget, consulted before each batch
        self._batches: dict[int, _Batch] = {}  # by thread: batches of concurrent tool calls
        self._root_lm: Any = None
        self._root_seen = 0
        self.last_root_call: tuple[int, int] = (0, 0)  # (input, output) tokens of the latest root call

    # -- sub-calls (the fan-out's hooks) --------------------------------------------------------
    def batch_started(self, prompts: Sequence[Any], params: dict[str, Any]) -> None:
        if self.budget is not None:
            self.budget.check_batch(prompts, params)  # raises BudgetExceeded: nothing is sent
        with self._lock:
            self._batches[threading.get_ident()] = _Batch(total=len(prompts))

    def chunk_arrived(self, answers: Sequence[Answer]) -> None:
        with self._lock:
            batch = self._batches.get(threading.get_ident())
            if batch is not None:
                batch.done += len(answers)
                batch.cache_hits += sum(1 for a in answers if a.cached)

    def add(self, answers: Sequence[Answer]) -> None:
        super().add(answers)
        with self._lock:
            batch = self._batches.pop(threading.get_ident(), None)
            if batch is not None:
                self.sub.seconds += time.monotonic() - batch.started
            for a in answers:
                tokens_in = int(a.usage.get("prompt_tokens", 0))
                tokens_out = int(a.usage.get("completion_tokens", 0))
                cost = a.cost if a.cost is not None else price(self.sub_model, tokens_in, tokens_out)
                self.sub.add(input_tokens=tokens_in, output_tokens=tokens_out, cost=cost, cached=a.cached, ok=a.ok)

    # -- root LM ----------------------------------------------------------------------------
    def watch_root(self, lm: Any) -> None:
        self._root_lm = lm
        self._root_seen = len(getattr(lm, "history", []) or [])

    def sync_root(self) -> None:
        """Account the root LM's calls made since the last sync (its ``history``)."""
        lm = self._root_lm
        if lm is None:
            return
        with self._lock:
            history = list(getattr(lm, "history", []) or [])
            if len(history) < self._root_seen:  # DSPy trimmed its history (max_history_size)
                self._root_seen = 0
            for entry in history[self._root_seen:]:
                self._add_root_entry(entry)
            self._root_seen = len(history)

    def _add_root_entry(self, entry: dict[str, Any]) -> None:
        billed = entry.get("usage") or {}
        full = _tokens(billed) if billed else _tokens(getattr(entry.get("response"), "usage", None))
        cached = not billed and any(full)
        model = str(entry.get("model") or self.root_model)
        cost = price(model, *full)
        self.root.add(input_tokens=full[0], output_tokens=full[1], cost=cost, cached=cached)
        self.last_root_call = full

    # -- reading ----------------------------------------------------------------------------
    def totals(self) -> dict[str, Any]:
        root, sub = self.root, self.sub
        return {
            "calls": root.calls + sub.calls, "cache_hits": root.cache_hits + sub.cache_hits,
            "input_tokens": root.input_tokens + sub.input_tokens, "output_tokens": root.output_tokens + sub.output_tokens,
            "paid_input_tokens": root.paid_input_tokens + sub.paid_input_tokens,
            "paid_output_tokens": root.paid_output_tokens + sub.paid_output_tokens,
            "cost_paid": round(root.cost_paid + sub.cost_paid, 8),
            "cost_uncached": round(root.cost_uncached + sub.cost_uncached, 8),
            "priced": root.unpriced_calls + sub.unpriced_calls == 0,
        }

    def usage(self) -> dict[str, Any]:
        """The usage document: stored with progress, the result, and shown by status and the UI."""
        self.sync_root()
        with self._lock:
            return {"root": {"model": self.root_model, **self.root.as_dict()},
                    "sub": {"model": self.sub_model, **self.sub.as_dict()},
                    "total": self.totals()}

    def paid(self) -> tuple[float, int]:
        """(dollars, tokens) paid so far: what budgets count."""
        self.sync_root()
        with self._lock:
            t = self.totals()
            return t["cost_paid"], t["paid_input_tokens"] + t["paid_output_tokens"]

    def snapshot(self) -> dict[str, Any]:
        out = super().snapshot()
        usage = self.usage()
        with self._lock:
            live = list(self._batches.values())
        if live:  # answers of the batch in flight count at once, not when the batch ends
            out["llm_calls"] += sum(b.done for b in live)
            out["cache_hits"] += sum(b.cache_hits for b in live)
            out["batch"] = {"done": sum(b.done for b in live), "total": sum(b.total for b in live),
                            "cache_hits": sum(b.cache_hits for b in live)}
        else:
            out["batch"] = None
        out["cost_usd"] = usage["total"]["cost_paid"]
        out["usage"] = usage
        return out

    def group_marks(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Counters of both groups now, for per-step differences."""
        self.sync_root()
        with self._lock:
            return self.root.as_dict(), self.sub.as_dict()


def _tokens(usage: Any) -> tuple[int, int]:
    """(input, output) tokens from an OpenAI-style dict, an lm15 ``Usage`` or a LiteLLM ``Usage``."""
    if usage is None:
        return 0, 0

    def get(*names: str) -> int:
        for name in names:
            value = usage.get(name) if isinstance(usage, dict) else getattr(usage, name, None)
            if value:
                try:
                    return int(value)
                except (TypeError, ValueError):
                    continue
        return 0

    return get("prompt_tokens", "input_tokens"), get("completion_tokens", "output_tokens")
