"""Fan-out of a run's sub-LLM calls across the ``llm`` queue.

``Fanout.query(prompts)`` splits a batch into chunks, dispatches ONE Celery group of ``llm_batch``
sub-tasks and gathers them event-driven, returning answers in prompt order; a failed prompt is an
``Answer`` with its error; on gather timeout the stragglers are revoked and reported as errors.
``workers.rlm`` gives it to sandbox code as ``llm_query`` / ``llm_query_batched``, and
``workers.engines.FleetLM`` to sub-agents.

A sub-task held by an llm worker that died (no heartbeat: ``workers.liveness``) is sent again
within about a second of the heartbeat's expiry, up to ``MAX_RESENDS`` times per chunk; the first
answer for a chunk wins, and the response cache's single flight keeps a copy that is still alive
from paying twice. The gather rides out a Redis restart (it waits and joins again).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import group
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import ResultSet
from kombu.exceptions import OperationalError

from rlmq.celery_config import LLM_TASK
from rlmq.settings import Settings
from workers.answer import Answer
from workers.context import redis_client
from workers.liveness import lost_subtasks
from workers.llm_call import Messages

__all__ = ["Fanout", "FanoutCancelled", "FanoutStats", "plan_chunks"]

GATHER_INTERVAL = 0.01  # seconds; Celery's 0.5 s default would add up to half a second per batch
LIVENESS_CHECK_SECONDS = 1.0  # how often a gather asks whether its pending sub-tasks' workers live
MAX_RESENDS = 3  # per chunk: a chunk that kills every worker it lands on is not sent forever
_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError)

logger = logging.getLogger(__name__)


class _Lost(Exception):
    def __init__(self, task_ids: list[str]) -> None:
        super().__init__(task_ids)
        self.task_ids = task_ids


class _Rejoin(Exception):
    """Answers were read directly from the result backend: join again on what is left."""


def _stored_results(backend: Any, task_ids: list[str]) -> dict[str, Any]:
    """Results already stored for ``task_ids`` (one MGET): a result published while this process's
    pub/sub connection was down (a Redis restart) is never announced again."""
    raws = backend.mget([backend.get_key_for_task(t) for t in task_ids])
    ready = {}
    for task_id, raw in zip(task_ids, raws):
        if raw:
            meta = backend.decode_result(raw)
            if meta.get("status") in ("SUCCESS", "FAILURE"):
                ready[task_id] = meta.get("result")
    return ready


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
    resent: int = 0  # sub-tasks sent again because their worker died
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
                    "cost_usd": round(self.cost, 6), "llm_workers": dict(self.workers),
                    "subtasks_resent": self.resent}


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
        def signature(payload: list[Any]) -> Any:
            # Flower shows what a sub-task is, never its prompts (argsrepr/kwargsrepr); the run is its parent.
            return self.app.signature(LLM_TASK, args=(payload, self.model, self.options, params),
                                      argsrepr=f"({len(payload)} prompt(s), {self.model!r})",
                                      kwargsrepr=f"{{'run': {self.run_id!r}}}",
                                      parent_id=self.run_id, root_id=self.run_id)

        sent = group(signature(payload) for payload in payloads).apply_async()
        results = {r.id: r for r in sent.results}  # every copy ever sent, by task id
        pending = {r.id: n for n, r in enumerate(sent.results)}  # task id -> chunk, until answered
        resends: Counter[int] = Counter()
        deadline = time.monotonic() + self.settings.gather_timeout
        next_check = [time.monotonic() + LIVENESS_CHECK_SECONDS]

        def collect(task_id: str, value: Any) -> None:
            n = pending.get(task_id)
            if n is None:
                return  # a chunk answered already by another copy
            for other in [t for t, m in pending.items() if m == n]:
                del pending[other]
            indexes = chunks[n]
            if isinstance(value, list) and len(value) == len(indexes):
                for i, raw in zip(indexes, value):
                    answers[i] = Answer.from_json_dict(raw)
            else:  # the sub-task itself failed (it should not): every prompt of it is an error
                for i in indexes:
                    answers[i] = Answer(error=f"sub-task failed: {value!r}"[:300])
            self.stats.chunk_arrived([answers[i] for i in indexes])  # live progress of the batch

        def check() -> None:
            if self.should_stop is not None and self.should_stop():
                raise FanoutCancelled("run cancelled")
            if time.monotonic() < next_check[0]:
                return
            next_check[0] = time.monotonic() + LIVENESS_CHECK_SECONDS
            try:
                stored = _stored_results(self.app.backend, list(pending))
            except Exception as exc:
                logger.debug("could not read stored results: %r", exc)
                stored = {}
            for task_id, value in stored.items():
                collect(task_id, value)
            if stored:
                raise _Rejoin()
            candidates = [t for t, n in pending.items() if resends[n] < MAX_RESENDS]
            try:
                lost = lost_subtasks(redis_client(self.settings.redis_url or None), candidates) if candidates else []
            except Exception as exc:  # a liveness look-up must never break a gather
                logger.warning("liveness check failed: %r", exc)
                lost = []
            if lost:
                raise _Lost(lost)

        timed_out = False
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            waiting = ResultSet([results[t] for t in pending], app=self.app)
            try:
                waiting.join_native(timeout=left, propagate=False, interval=GATHER_INTERVAL, callback=collect,
                                    on_interval=check, disable_sync_subtasks=False)
            except _Lost as lost:
                self.app.control.revoke(lost.task_ids)
                for task_id in lost.task_ids:
                    n = pending.pop(task_id, None)
                    if n is None:
                        continue
                    copy = signature(payloads[n]).apply_async()
                    results[copy.id] = copy
                    pending[copy.id] = n
                    resends[n] += 1
                    self.stats.resent += 1
                logger.warning("%d sub-task(s) were on a dead llm worker: sent again", len(lost.task_ids))
            except _Rejoin:
                continue
            except FanoutCancelled:
                self.app.control.revoke(list(pending))
                raise
            except (CeleryTimeoutError, TimeoutError):
                timed_out = True
                break
            except _OUTAGE_ERRORS as exc:  # Redis restarting: the answers are stored once it is back
                logger.warning("gather interrupted (%r); joining again", exc)
                time.sleep(0.5)
        if not timed_out:
            return
        for task_id in list(pending):  # salvage sub-tasks that finished but were not yet delivered
            r = results[task_id]
            try:
                if task_id in pending and r.ready():
                    collect(task_id, r.get(propagate=False, disable_sync_subtasks=False))
            except Exception:
                pass
        if pending:
            self.app.control.revoke(list(pending))
        why = f"timed out after {self.settings.gather_timeout:g}s waiting for an llm worker"
        for i, a in enumerate(answers):
            if a is None:
                answers[i] = Answer(error=why)
