"""What one run used: root-LM and sub-LLM calls, tokens, cache hits, dollars paid and uncached.

``RunUsage`` is the run's one set of counters (a ``CallUsage`` per kind of call, the shapes in
:mod:`rlmq.store.records`). Sub-calls reach it as the fan-out's observer
(:class:`~workers.fanout.FanoutObserver`); root-LM calls are read from the ``dspy.LM``
history: an entry whose ``usage`` is empty while its response carries token counts was a
``dspy.cache`` hit (DSPy drops the billed usage of a hit but keeps the response). Prices come from
LiteLLM's table (:mod:`workers.pricing`).

It also tracks the fan-out batch in flight (answers count as each sub-task's arrive), so progress
shows done/total and cache hits while a 500-prompt batch runs, and lets a
:class:`~workers.budget.Budget` refuse a batch before it is sent.

What it counts it also hands to its ``meter`` (each batch, each root call: the delta), which adds
it to the fleet's Prometheus totals (``rlmq.store.metrics.add_usage``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from rlmq.store.records import Batch, CallUsage, Progress, RunSandbox, Usage
from workers.answer import Answer
from workers.pricing import price

if TYPE_CHECKING:
    from workers.budget import Budget  # which reads this run's usage: a runtime import would be circular
    from workers.llm_call import Messages

__all__ = ["RunUsage", "root_call_tokens"]


@dataclass
class _InFlight:
    total: int
    done: int = 0
    cache_hits: int = 0
    started: float = field(default_factory=time.monotonic)


class RunUsage:
    """The run's usage; thread-safe (tool threads, the run thread and the progress tick all touch it)."""

    def __init__(self, *, root_model: str, sub_model: str,
                 meter: Callable[[CallUsage, bool], None] | None = None) -> None:
        self.root = CallUsage(model=root_model)
        self.meter = meter  # (calls just counted, sub-calls or not): the fleet's totals
        self.sub = CallUsage(model=sub_model)
        self.budget: Budget | None = None  # consulted before each batch is sent
        self.workers: Counter[str] = Counter()  # sub-calls answered, per llm worker
        self.subtasks_resent = 0
        self._lock = threading.Lock()
        self._batches: dict[int, _InFlight] = {}  # by thread: batches of concurrent tool calls
        self._root_lm: Any = None  # a dspy.LM (or anything with its ``history``)
        self._root_seen = 0
        self.last_root_call: tuple[int, int] = (0, 0)  # (input, output) tokens of the latest root call

    @property
    def root_model(self) -> str:
        return self.root.model

    @property
    def sub_model(self) -> str:
        return self.sub.model

    # -- sub-calls: the fan-out's observer -------------------------------------------------------
    def batch_started(self, prompts: Sequence[str | Messages], params: dict[str, Any]) -> None:
        if self.budget is not None:
            self.budget.check_batch(prompts, params)  # raises BudgetExceeded: nothing is sent
        with self._lock:
            self._batches[threading.get_ident()] = _InFlight(total=len(prompts))

    def chunk_arrived(self, answers: Sequence[Answer]) -> None:
        with self._lock:
            batch = self._batches.get(threading.get_ident())
            if batch is not None:
                batch.done += len(answers)
                batch.cache_hits += sum(1 for a in answers if a.cached)

    def batch_done(self, answers: Sequence[Answer]) -> None:
        with self._lock:
            before = replace(self.sub)
            batch = self._batches.pop(threading.get_ident(), None)
            if batch is not None:
                self.sub.seconds += time.monotonic() - batch.started
            for a in answers:
                if a.worker:
                    self.workers[a.worker] += 1
                tokens_in = int(a.usage.get("prompt_tokens", 0))
                tokens_out = int(a.usage.get("completion_tokens", 0))
                cost = a.cost if a.cost is not None else price(self.sub.model, tokens_in, tokens_out)
                self.sub.count(input_tokens=tokens_in, output_tokens=tokens_out, cost=cost, cached=a.cached, ok=a.ok)
            added = self.sub.minus(before)
        if self.meter is not None:
            self.meter(added, True)

    def resent(self, n: int) -> None:
        with self._lock:
            self.subtasks_resent += n

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
            before = replace(self.root)
            history = list(getattr(lm, "history", []) or [])
            if len(history) < self._root_seen:  # DSPy trimmed its history (max_history_size)
                self._root_seen = 0
            for entry in history[self._root_seen:]:
                self._add_root_entry(entry)
            self._root_seen = len(history)
            added = self.root.minus(before)
        if self.meter is not None and added.calls:
            self.meter(added, False)

    def _add_root_entry(self, entry: dict[str, Any]) -> None:
        tokens_in, tokens_out, cached = root_call_tokens(entry)
        full = (tokens_in, tokens_out)
        model = str(entry.get("model") or self.root.model)
        self.root.count(input_tokens=full[0], output_tokens=full[1], cost=price(model, *full), cached=cached)
        self.last_root_call = full

    # -- reading ----------------------------------------------------------------------------
    def usage(self) -> Usage:
        """A copy of the counters now."""
        self.sync_root()
        with self._lock:
            return Usage(root=replace(self.root), sub=replace(self.sub))

    def paid(self) -> tuple[float, int]:
        """(dollars, tokens) paid so far: what budgets count."""
        total = self.usage().total
        return total.cost_paid, total.paid_tokens

    def progress(self, *, iteration: int = 0, max_iters: int = 0, elapsed: float = 0.0,
                 sandbox: RunSandbox | None = None) -> Progress:
        """The run's progress with these counters (the run engine knows the rest)."""
        self.sync_root()
        with self._lock:  # one lock: a batch that just ended is in usage or in flight, never both
            live = list(self._batches.values())
            batch = Batch(total=sum(b.total for b in live), done=sum(b.done for b in live),
                          cache_hits=sum(b.cache_hits for b in live)) if live else None
            return Progress(iteration=iteration, max_iters=max_iters, elapsed=elapsed,
                            usage=Usage(root=replace(self.root), sub=replace(self.sub)), batch=batch,
                            llm_workers=dict(self.workers), subtasks_resent=self.subtasks_resent, sandbox=sandbox)


def root_call_tokens(entry: dict[str, Any]) -> tuple[int, int, bool]:
    """(input, output tokens, cached) of one ``dspy.LM.history`` entry: a ``dspy.cache`` hit has an empty
    ``usage`` while its response keeps the token counts."""
    billed = entry.get("usage") or {}
    full = _tokens(billed) if billed else _tokens(getattr(entry.get("response"), "usage", None))
    return full[0], full[1], not billed and any(full)


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
