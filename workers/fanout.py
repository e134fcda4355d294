"""Fan-out of an RLM's sub-LLM calls across the ``llm`` queue.

``FleetRLM`` is ``dspy.RLM`` with one private hook replaced, ``_make_llm_tools(budget,
max_workers)`` (see ``workers.dspy_private``):
``llm_query_batched`` reserves the whole batch against ``max_llm_calls`` up front (DSPy's
semantics), splits it into chunks, dispatches ONE Celery group of ``llm_batch`` sub-tasks and
gathers them event-driven, returning answers in prompt order; a failed prompt is an
``[ERROR] ...`` string; on gather timeout the stragglers are revoked and reported as errors.
``llm_query`` takes the same path with one prompt.

``FleetLM`` is the run's ``sub_lm``: a ``dspy.LM`` whose engine sends each request through the
same path, so sub-agents built by sandbox code (``dspy.Predict(...)`` via DSPy's facade, which
charges the budget itself) are cached, rate limited and spread over the fleet too.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
from celery import group
from celery.exceptions import TimeoutError as CeleryTimeoutError
from dspy.lm15 import Message, Response, ServerError, TextPart, Usage, response_to_events

from rlmq.celery_config import LLM_TASK
from rlmq.settings import Settings
from workers.dspy_private import LLMCallBudget
from workers.llm_call import Answer, Messages

__all__ = ["Fanout", "FanoutCancelled", "FanoutStats", "FleetEngine", "FleetLM", "FleetRLM", "plan_chunks"]

GATHER_INTERVAL = 0.01  # seconds; Celery's 0.5 s default would add up to half a second per batch


class FanoutCancelled(Exception):
    """The run was cancelled while a batch was in flight (its sub-tasks were revoked)."""


@dataclass
class FanoutStats:
    """Counters of one run's sub-LLM traffic; updated from tool threads."""

    prompts: int = 0
    cache_hits: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    workers: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, answers: Sequence[Answer]) -> None:
        with self._lock:
            for a in answers:
                self.prompts += 1
                self.errors += 0 if a.ok else 1
                if a.worker:
                    self.workers[a.worker] += 1
                if a.cached:
                    self.cache_hits += 1
                    continue  # a hit costs nothing; its usage was paid by the first asker
                self.prompt_tokens += int(a.usage.get("prompt_tokens", 0))
                self.completion_tokens += int(a.usage.get("completion_tokens", 0))
                self.cost += float(a.cost or 0.0)

    # Hooks for live progress and budgets (workers.usage.RunUsage fills them in).
    def batch_started(self, prompts: Sequence[Any], params: dict[str, Any]) -> None:
        """Before a batch is sent; may raise to refuse it (nothing is sent then)."""

    def chunk_arrived(self, answers: Sequence[Answer]) -> None:
        """One sub-task's answers, as they arrive during the gather."""

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"llm_calls": self.prompts, "cache_hits": self.cache_hits, "llm_errors": self.errors,
                    "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                    "cost_usd": round(self.cost, 6), "llm_workers": dict(self.workers)}


def plan_chunks(n: int, chunk_size: int, width: int) -> list[tuple[int, int]]:
    """[start, end) slices: ``chunk_size`` prompts per message, but at least ``width`` messages
    (up to one per prompt) so a mid-sized batch still spreads over the whole fleet."""
    if n <= 0:
        return []
    count = min(n, max(math.ceil(n / chunk_size), width))
    base, extra = divmod(n, count)
    bounds, start = [], 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class Fanout:
    """Sends prompts to the ``llm`` queue as one group per batch and gathers the answers."""

    def __init__(self, settings: Settings, *, app: Any, options: dict[str, Any] | None = None,
                 stats: FanoutStats | None = None, should_stop: Callable[[], bool] | None = None,
                 run_id: str | None = None) -> None:
        self.settings = settings
        self.app = app  # sends llm_batch by name: the engine does not import the task modules
        self.model = settings.effective_sub_lm
        self.options = dict(options or {})  # the run's per-run options; each sub-task applies them
        self.stats = stats or FanoutStats()
        self.should_stop = should_stop
        self.run_id = run_id  # names the sub-tasks' parent in Flower

    def query(self, prompts: Sequence[str | Messages], params: dict[str, Any] | None = None) -> list[Answer]:
        """Answers for ``prompts``, in order; never raises for a failed prompt."""
        answers: list[Answer | None] = [None] * len(prompts)
        todo = []
        for i, p in enumerate(prompts):
            if isinstance(p, str) and not p.strip():
                answers[i] = Answer(error="empty prompt")
            else:
                todo.append(i)
        bounds = plan_chunks(len(todo), self.settings.chunk_size, self.settings.fanout_width)
        chunks = [[todo[j] for j in range(a, b)] for a, b in bounds]
        if chunks:
            self.stats.batch_started([prompts[i] for i in todo], params or {})  # budget check, live progress
            self._dispatch([[prompts[i] for i in c] for c in chunks], chunks, answers, params or {})
        done = [a if a is not None else Answer(error="no answer") for a in answers]
        self.stats.add(done)
        return done

    def _dispatch(self, payloads: list[list[Any]], chunks: list[list[int]], answers: list[Answer | None],
                  params: dict[str, Any]) -> None:
        # Flower shows what a sub-task is, never its prompts (argsrepr/kwargsrepr); the run is its parent.
        job = group(self.app.signature(LLM_TASK, args=(payload, self.model, self.options, params),
                                       argsrepr=f"({len(payload)} prompt(s), {self.model!r})",
                                       kwargsrepr=f"{{'run': {self.run_id!r}}}",
                                       parent_id=self.run_id, root_id=self.run_id)
                    for payload in payloads)
        result = job.apply_async()
        slot = {r.id: n for n, r in enumerate(result.results)}

        def collect(task_id: str, value: Any) -> None:
            indexes = chunks[slot[task_id]]
            if isinstance(value, list) and len(value) == len(indexes):
                for i, raw in zip(indexes, value):
                    answers[i] = Answer.from_json_dict(raw)
            else:  # the sub-task itself failed (it should not): every prompt of it is an error
                for i in indexes:
                    answers[i] = Answer(error=f"sub-task failed: {value!r}"[:300])
            self.stats.chunk_arrived([answers[i] for i in indexes])  # live progress of the batch

        def check_stop() -> None:
            if self.should_stop is not None and self.should_stop():
                raise FanoutCancelled("run cancelled")

        try:
            result.join_native(timeout=self.settings.gather_timeout, propagate=False, interval=GATHER_INTERVAL,
                               callback=collect, on_interval=check_stop, disable_sync_subtasks=False)
        except (CeleryTimeoutError, TimeoutError, FanoutCancelled) as exc:
            pending = [r.id for r in result.results if not r.ready()]
            for r in result.results:  # salvage sub-tasks that finished but were not yet delivered
                if r.id not in pending and answers[chunks[slot[r.id]][0]] is None:
                    collect(r.id, r.get(propagate=False, disable_sync_subtasks=False))
            if pending:
                self.app.control.revoke(pending)
            if isinstance(exc, FanoutCancelled):
                raise
            why = f"timed out after {self.settings.gather_timeout:g}s waiting for an llm worker"
            for i, a in enumerate(answers):
                if a is None:
                    answers[i] = Answer(error=why)


def make_llm_tools(fanout: Fanout, budget: LLMCallBudget) -> dict[str, Callable[..., Any]]:
    """``llm_query`` / ``llm_query_batched`` for sandbox code, charged to ``budget``."""

    def llm_query(prompt: str) -> str:
        """Query the LLM with a prompt string."""
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        budget.reserve(1)
        return fanout.query([prompt])[0].for_sandbox()

    def llm_query_batched(prompts: list[str]) -> list[str]:
        """Query prompts concurrently; a failed prompt comes back as an '[ERROR] ...' string."""
        if not prompts:
            return []
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("llm_query_batched takes a list of prompt strings")
        budget.reserve(len(prompts))  # the whole batch up front, as DSPy does
        return [a.for_sandbox() for a in fanout.query(prompts)]

    return {"llm_query": llm_query, "llm_query_batched": llm_query_batched}


class FleetRLM(dspy.RLM):
    """``dspy.RLM`` whose sub-LLM calls (tools and sub-agents) go through the Celery fleet."""

    def __init__(self, signature: Any, *, fanout: Fanout, **kwargs: Any) -> None:
        kwargs.setdefault("sub_lm", FleetLM(fanout))
        super().__init__(signature, **kwargs)
        self.fanout = fanout

    def _make_llm_tools(self, budget: LLMCallBudget | None = None, max_workers: int = 8) -> dict[str, Callable]:
        # max_workers is DSPy's thread count for its own batch; the fleet's width replaces it.
        return make_llm_tools(self.fanout, budget if budget is not None else LLMCallBudget(self.max_llm_calls))


class FleetEngine:
    """A DSPy 3.4 engine (``complete(Request) -> Response``) answering through :class:`Fanout`."""

    def __init__(self, fanout: Fanout) -> None:
        self.fanout = fanout

    def complete(self, request: Any) -> Response:
        messages: Messages = []
        if request.system is not None:
            system = request.system if isinstance(request.system, str) else "".join(
                getattr(p, "text", "") or "" for p in request.system)
            messages.append({"role": "system", "content": system})
        messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
        config = request.config
        params = {k: v for k, v in (("temperature", config.temperature), ("max_tokens", config.max_tokens),
                                    ("top_p", config.top_p), ("seed", config.seed)) if v is not None}
        if config.stop:
            params["stop"] = list(config.stop)
        answer = self.fanout.query([messages], params=params)[0]
        if not answer.ok:
            raise ServerError(answer.error or "no answer")  # DSPy maps it to LMServerError for the facade
        usage = answer.usage
        return Response(id=None, model=self.fanout.model, message=Message.assistant([TextPart(answer.text or "")]),
                        finish_reason="stop",
                        usage=Usage(input_tokens=int(usage.get("prompt_tokens", 0)),
                                    output_tokens=int(usage.get("completion_tokens", 0)),
                                    total_tokens=int(usage.get("total_tokens", 0))))

    def stream(self, request: Any) -> Any:
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


class FleetLM(dspy.LM):
    """The run's sub-LM: model = the run's sub-LM string; calls go through the fleet.

    DSPy's own response cache and retries are off: the ``llm_batch`` sub-task has both.
    """

    def __init__(self, fanout: Fanout, **kwargs: Any) -> None:
        super().__init__(fanout.model, engine=FleetEngine(fanout), cache=False, num_retries=0, **kwargs)
