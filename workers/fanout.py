"""Fan-out of a run's sub-LLM calls across the ``llm`` queue.

``Fanout.query(prompts)`` splits a batch into chunks, dispatches ONE Celery group of ``llm_batch``
sub-tasks and gathers them event-driven, returning answers in prompt order; a failed prompt is an
``Answer`` with its error; on gather timeout the stragglers are revoked and reported as errors.
``workers.rlm`` gives it to sandbox code as ``llm_query`` / ``llm_query_batched``, and
``workers.engines.FleetLM`` to sub-agents. What a batch does is reported to a
:class:`FanoutObserver` (the run's ``workers.usage.RunUsage``: counters, live progress, and the
budget check that may refuse a batch before it is sent).

A sub-task held by an llm worker that died (no heartbeat: ``workers.liveness``) is sent again
within about a second of the heartbeat's expiry, up to ``MAX_RESENDS`` times per chunk; the first
answer for a chunk wins, and the response cache's single flight keeps a copy that is still alive
from paying twice. The gather rides out a Redis restart or failover: Celery's result backend reconnects
its pub/sub (``rlmq.celery_config.OUTAGE_RETRY_POLICY``), stored answers are read directly (below), and
a join that meets Redis away is tried again (:data:`GATHER_INTERRUPTIONS`): a gather ends only with every
answer, its deadline, or its run's cancel, never with an error the sandbox code would see.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis
from celery import group
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import ResultSet
from kombu.exceptions import KombuError, OperationalError

from rlmq.celery_config import LLM_QUEUE, LLM_TASK
from rlmq.settings import Settings
from workers.answer import Answer
from workers.context import redis_client
from workers.liveness import missing_subtasks
from workers.llm_call import Messages
from workers.log_format import error_text
from workers.tracing import NULL_SPANS, RunSpans

__all__ = ["Fanout", "FanoutCancelled", "FanoutObserver", "plan_chunks"]

GATHER_INTERVAL = 0.01  # seconds; Celery's 0.5 s default would add up to half a second per batch
LIVENESS_CHECK_SECONDS = 1.0  # how often a gather asks whether its pending sub-tasks' workers live
MAX_RESENDS = 3  # per chunk: a chunk that kills every worker it lands on is not sent forever
# Redis away under a join (a failover, a restart): Celery's result backend reads the results' state each
# time a gather joins, with a client that does not retry, and raises at once; only its pub/sub reconnects
# by itself. The gather joins again after REJOIN_PAUSE_SECONDS, so the error never reaches sandbox code as
# the batch's outcome (it did: issue #19 (c), a step whose output was a ConnectionError). OSError: a
# socket's own timeout or reset.
GATHER_INTERRUPTIONS = (redis.ConnectionError, redis.TimeoutError, OperationalError, OSError)
REJOIN_PAUSE_SECONDS = 0.5

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
    for task_id, raw in zip(task_ids, raws, strict=True):
        if raw:
            meta = backend.decode_result(raw)
            if meta.get("status") in ("SUCCESS", "FAILURE"):
                ready[task_id] = meta.get("result")
    return ready


class FanoutCancelled(Exception):
    """The run was cancelled while a batch was in flight (its sub-tasks were revoked)."""


class FanoutObserver(Protocol):
    """What a fan-out reports as a batch goes (``workers.usage.RunUsage`` counts it), in order:
    ``batch_started``, then ``chunk_arrived`` per sub-task answered, ``resent`` per dead worker's
    sub-tasks sent again, and ``batch_done`` with every answer. A batch runs in one thread; the
    run's concurrent tool calls run batches in several at once."""

    def batch_started(self, prompts: Sequence[str | Messages], params: dict[str, Any]) -> None:
        """Before the batch is sent; raising refuses it whole (nothing is sent)."""

    def chunk_arrived(self, answers: Sequence[Answer]) -> None:
        """One sub-task's answers, as they arrive during the gather."""

    def resent(self, n: int) -> None:
        """``n`` sub-tasks were sent again because the worker holding them died."""

    def batch_done(self, answers: Sequence[Answer]) -> None:
        """Every answer of the batch, in prompt order (failed prompts as errors)."""


class _Unobserved:
    """The observer of a fan-out nobody watches (benchmarks, sub-agents in tests)."""

    def batch_started(self, prompts: Sequence[str | Messages], params: dict[str, Any]) -> None:
        pass

    def chunk_arrived(self, answers: Sequence[Answer]) -> None:
        pass

    def resent(self, n: int) -> None:
        pass

    def batch_done(self, answers: Sequence[Answer]) -> None:
        pass


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
                 observer: FanoutObserver | None = None, should_stop: Callable[[], bool] | None = None,
                 run_id: str | None = None) -> None:
        self.settings = settings
        self.app = app  # sends llm_batch by name: the engine does not import the task modules
        self.model = settings.effective_sub_lm
        self.options = dict(options or {})  # the run's per-run options; each sub-task applies them
        self.observer: FanoutObserver = observer if observer is not None else _Unobserved()
        self.should_stop = should_stop
        self.run_id = run_id  # names the sub-tasks' parent in Flower
        self.spans: RunSpans = NULL_SPANS  # the run's trace, if traced: a batch span per query

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
            self.observer.batch_started([prompts[i] for i in todo], params or {})  # budget check, live progress
            with self.spans.batch(len(todo), self.model) as headers:
                self._dispatch([[prompts[i] for i in c] for c in chunks], chunks, answers, params or {}, headers)
        done = [a if a is not None else Answer(error="no answer") for a in answers]
        self.observer.batch_done(done)
        return done

    def _send(self, sub_tasks: Any) -> Any:
        """Send the group's messages in one pipeline (kombu's publish batch), not one round trip to Redis
        each (64 messages, 2.6 s at 40 ms a round trip, before). If the pipeline fails, delivery is
        uncertain: the group is sent again message by message (with Celery's publish retries), a copy of
        a sub-task costing nothing (the first answer wins; single flight keeps it from paying twice)."""
        try:
            with self.app.producer_or_acquire() as producer:
                batch = producer.batch() if hasattr(producer, "batch") else contextlib.nullcontext()  # kombu < 5.7
                with batch:
                    return sub_tasks.apply_async(producer=producer)
        except (KombuError, redis.RedisError, OSError) as exc:  # BatchPublishError, or the connection failing first
            logger.warning("sending a batch's sub-tasks in one pipeline failed (%s): sending them one by one",
                           error_text(exc))
            return sub_tasks.apply_async()

    def _dispatch(self, payloads: list[list[Any]], chunks: list[list[int]], answers: list[Answer | None],
                  params: dict[str, Any], headers: dict[str, str]) -> None:
        def signature(payload: list[Any]) -> Any:
            # Flower shows what a sub-task is, never its prompts (argsrepr/kwargsrepr); the run is its parent.
            return self.app.signature(LLM_TASK, args=(payload, self.model, self.options, params),
                                      argsrepr=f"({len(payload)} prompt(s), {self.model!r})",
                                      kwargsrepr=f"{{'run': {self.run_id!r}}}",
                                      parent_id=self.run_id, root_id=self.run_id,
                                      headers=headers)  # the batch span's traceparent, when traced

        sent = self._send(group([signature(payload) for payload in payloads]))  # a list: _send may send it twice
        results = {r.id: r for r in sent.results}  # every copy ever sent, by task id
        pending = {r.id: n for n, r in enumerate(sent.results)}  # task id -> chunk, until answered
        resends: Counter[int] = Counter()
        deadline = time.monotonic() + self.settings.gather_timeout
        next_check = [time.monotonic() + LIVENESS_CHECK_SECONDS]
        suspects: set[str] = set()  # sub-tasks neither queued nor held at the last check

        def collect(task_id: str, value: Any) -> None:
            n = pending.get(task_id)
            if n is None:
                return  # a chunk answered already by another copy
            for other in [t for t, m in pending.items() if m == n]:
                del pending[other]
            indexes = chunks[n]
            if isinstance(value, list) and len(value) == len(indexes):
                arrived = [Answer.from_json_dict(raw) for raw in value]
            else:  # the sub-task itself failed (it should not): every prompt of it is an error
                arrived = [Answer(error=f"sub-task failed: {value!r}"[:300]) for _ in indexes]
            for i, answer in zip(indexes, arrived, strict=True):
                answers[i] = answer
            self.observer.chunk_arrived(arrived)  # live progress of the batch

        def stop_if_cancelled() -> None:
            if self.should_stop is not None and self.should_stop():
                raise FanoutCancelled("run cancelled")

        def check() -> None:
            stop_if_cancelled()
            if time.monotonic() < next_check[0]:
                return
            next_check[0] = time.monotonic() + LIVENESS_CHECK_SECONDS
            try:
                stored = _stored_results(self.app.backend, list(pending))
            except Exception as exc:
                logger.debug("could not read stored results: %s", error_text(exc))
                stored = {}
            for task_id, value in stored.items():
                collect(task_id, value)
            if stored:
                raise _Rejoin()
            candidates = [t for t, n in pending.items() if resends[n] < MAX_RESENDS]
            try:
                lost, vanished = missing_subtasks(redis_client(self.settings.redis_url or None), candidates, LLM_QUEUE)
            except Exception as exc:  # a liveness look-up must never break a gather
                logger.warning("liveness check failed: %s", error_text(exc))
                lost, vanished = [], []
            lost += sorted(suspects.intersection(vanished))  # vanished at two checks in a row (never also lost)
            suspects.clear()
            suspects.update(vanished)
            if lost:
                raise _Lost(lost)

        def resend(task_ids: list[str]) -> int:
            sent = 0
            for task_id in task_ids:
                n = pending.get(task_id)
                if n is None:
                    continue
                try:
                    copy = signature(payloads[n]).apply_async()
                except GATHER_INTERRUPTIONS as exc:  # left pending: the next checks find it again
                    logger.warning("could not send a lost sub-task again: %s", error_text(exc))
                    break
                del pending[task_id]
                results[copy.id] = copy
                pending[copy.id] = n
                resends[n] += 1
                sent += 1
            return sent

        timed_out = False
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            waiting = ResultSet([results[t] for t in pending], app=self.app)
            try:
                try:
                    waiting.join_native(timeout=left, propagate=False, interval=GATHER_INTERVAL, callback=collect,
                                        on_interval=check, disable_sync_subtasks=False)
                except GATHER_INTERRUPTIONS as exc:
                    logger.warning("gather of %d sub-task(s) interrupted, joining again: %s", len(pending),
                                   error_text(exc))
                    time.sleep(REJOIN_PAUSE_SECONDS)
                    stop_if_cancelled()
            except _Lost as lost:
                self._revoke(lost.task_ids)
                sent_again = resend(lost.task_ids)
                if sent_again:
                    self.observer.resent(sent_again)
                logger.warning("%d lost sub-task(s) sent again (on a dead llm worker, or gone from the queue)", sent_again)
            except _Rejoin:
                continue
            except FanoutCancelled:
                self._revoke(list(pending))
                raise
            except CeleryTimeoutError:
                timed_out = True
                break
        if not timed_out:
            return
        for task_id in list(pending):  # salvage sub-tasks that finished but were not yet delivered
            r = results[task_id]
            try:
                if task_id in pending and r.ready():
                    collect(task_id, r.get(propagate=False, disable_sync_subtasks=False))
            except Exception:
                pass
        self._revoke(list(pending))
        why = f"timed out after {self.settings.gather_timeout:g}s waiting for an llm worker"
        for i, a in enumerate(answers):
            if a is None:
                answers[i] = Answer(error=why)

    def _revoke(self, task_ids: list[str]) -> None:
        """Revoke sub-tasks, at best: a revoke is a broadcast, which Redis being away fails. A copy it misses
        answers for nothing (the first answer of a chunk wins; the response cache keeps the prompt paid once)."""
        if not task_ids:
            return
        try:
            self.app.control.revoke(task_ids)
        except GATHER_INTERRUPTIONS as exc:
            logger.warning("could not revoke %d sub-task(s): %s", len(task_ids), error_text(exc))
