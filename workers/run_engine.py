"""The run engine: one RLM run inside one worker process, from spec to result.

``tasks.run_rlm.run_rlm`` hands its Celery task to :class:`RunExecution`, which loads the spec and
inputs from Redis, claims the run (a QUEUED run becomes RUNNING as attempt ``n``; a second
delivery of the same run id does not execute), builds :class:`~workers.rlm.TracedRLM` on the sandbox
interpreter factory (sandboxes labelled ``rlmq.run=<id>`` and leased), runs it inside
``dspy.context(lm=root_lm)`` with the Redis-backed ``dspy.cache``, stores result and
trajectory, and always releases its sandbox. Every ending is recorded: SUCCEEDED, CANCELLED
(Celery state REVOKED, with a task-revoked event), or FAILED with a one-line error (details in
the record's ``error_detail``); the exception that Celery sees is a plain ``RunFailed``.

Resumption: the claim is renewed every tick; a worker that dies stops renewing and the recovery
sweep (``workers.recovery``) restarts the run as attempt ``n+1`` elsewhere. The new attempt replays
from the start through the Redis caches (root-LM calls via ``dspy.cache``, sub-calls via the
response cache), so answers paid before the crash are not paid again. Every write of this
attempt is fenced by ``n``: once it was superseded it writes nothing and ends with ``Ignore``.

Progress: a dspy callback on the RLM's action predictor marks each iteration, and the lease
keeper's 1-s tick republishes sub-call counters (including the batch in flight), both through
``publish`` (``workers.monitor``: Celery state STARTED with the progress as meta, a task-started
event Flower shows, and the run record). Steps are appended to the trajectory in Redis as they end
(``workers.trajectory``); usage and cost are ``workers.usage``; budgets (``workers.budget``) end
a run as STOPPED. Cancellation: a flag in
Redis seen by the tick (which then deletes the sandbox at once, so the next execute fails) and by
the fan-out's gather loop (which revokes its sub-tasks).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import dspy
import redis
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from dspy.utils.callback import BaseCallback

from broker_bridge import interpreter_factory
from rlmq.store.blobs import get_blobs
from rlmq.store.records import Progress, RunSandbox, RunSpec, RunStatus, RunStore
from rlmq.run_options import check_tools, with_options
from rlmq.settings import SandboxBackend, SettingsError
from workers.dspy_cache import install_redis_dspy_cache
from workers.context import redis_client, worker_settings
from workers.budget import Budget, BudgetExceeded
from workers.dspy_private import action_predictor, iteration_of
from workers.fanout import Fanout, FanoutCancelled
from workers.monitor import count, publish_progress, summary_line
from workers.rlm import TracedRLM
from workers.trajectory import TrajectoryLog
from workers.usage import RunUsage
from workers.engines import fleet_root_lm
from workers.sandbox_registry import LeaseKeeper, LeaseRegistry
from workers.user_tools import ToolLoadError, load_tools

__all__ = ["RunCancelled", "RunExecution", "RunFailed", "one_line"]

logger = logging.getLogger(__name__)

_PUBLISH_EVERY = 0.5  # seconds between progress updates while counters move
_OUTAGE_GRACE = 120.0  # seconds a final write waits for Redis to come back


class RunFailed(Exception):
    """The run ended badly; the message is the recorded error (details are in the worker log)."""


class RunCancelled(Exception):
    """A cancel was requested for this run."""


class _IterationCallback(BaseCallback):
    """Marks the start of each RLM iteration (the action predictor's call carries "k/max")."""

    def __init__(self, execution: RunExecution, predictor: Any) -> None:
        self.execution = execution
        self.predictor = predictor

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if instance is not self.predictor:
            return
        iteration = iteration_of(inputs)
        if iteration is not None:
            self.execution.iteration = iteration
            self.execution.publish(force=True)


class RunExecution:
    """The state of one run inside one worker process."""

    def __init__(self, task: Any, run_id: str) -> None:
        self.task = task
        self.run_id = run_id
        self.hostname = str(task.request.hostname or "")
        self.owner = f"{self.hostname}/{os.getpid()}"
        self.base = worker_settings()
        self.client = redis_client()
        self.store = RunStore(self.client, expire_seconds=self.base.result_expires)
        self.stats = RunUsage(root_model="", sub_model="")  # the run's models are known once its options are
        self.cancelled = threading.Event()
        self.iteration = 0
        self.max_iters = 0
        self.started = time.monotonic()
        self._publish_lock = threading.Lock()
        self._last_publish = 0.0
        self._last_counts: tuple[int, int] = (0, 0)
        self.keeper: LeaseKeeper | None = None
        # issue #10 (trajectory, usage, budgets): set up in _execute once the run's settings are known
        self.budget: Budget | None = None
        self.trace: TrajectoryLog | None = None
        self.started_wall = time.time()
        self._counted: tuple[int, int] = (0, 0)
        self.sandbox: RunSandbox | None = None  # the run's sandbox, once it exists
        self.attempt = 0  # set by the claim; every write of this execution is fenced by it
        self.fenced = threading.Event()  # the run moved on to a newer attempt without us

    def run(self) -> dict[str, Any]:
        record = self.store.get(self.run_id)
        if record is None:
            raise RunFailed(f"run {self.run_id} has no spec in Redis (was it submitted through rlmq?)")
        self.attempt = 0 if record.status.finished else self.store.claim(
            self.run_id, self.owner, self.base.lease_ttl, worker=self.hostname)
        if not self.attempt:
            logger.warning("run %s is already %s or owned elsewhere: not executing it twice",
                           self.run_id, record.status.value)
            raise Ignore()  # store no state: the owner's state must stand
        if self.attempt > 1:
            logger.warning("run %s: attempt %d, replaying through the caches (%s)", self.run_id, self.attempt,
                           record.restart_reason or "restarted")
        try:
            result = self._execute(record.spec)
        except BaseException as exc:
            return self._ended_badly(exc)
        finally:
            if self.keeper is not None:
                self.keeper.stop()
                self.keeper.destroy_all()  # normally empty: DSPy shut the interpreter down
            if self.trace is not None:
                self.trace.expire(self.base.result_expires)
        progress = self.progress()
        document = progress.to_json_dict()
        if not _when_redis_is_back(lambda: self.store.finish(
                self.run_id, RunStatus.SUCCEEDED,
                result={**result, "progress": document, "usage": document["usage"]},
                progress=progress, attempt=self.attempt)):
            logger.warning("run %s: attempt %d was superseded; its result is dropped", self.run_id, self.attempt)
            raise Ignore()
        # What Celery stores and Flower shows as the result: the summary first (Flower cuts long reprs).
        brief = {k: v for k, v in document.items() if k not in ("usage", "llm_workers")}
        return {"run_id": self.run_id, "status": RunStatus.SUCCEEDED.value, "summary": summary_line(progress), **brief}

    def _execute(self, spec: RunSpec) -> dict[str, Any]:
        try:  # the operator's pins, before any sandbox or LM call (the client may not know them)
            settings = with_options(self.base, spec.options)
            check_tools(self.base, spec.tools)
        except SettingsError as exc:
            raise RunFailed(str(exc)) from None
        self.max_iters = settings.max_iters
        if self.store.cancel_requested(self.run_id):
            raise RunCancelled()
        install_redis_dspy_cache(self.client, settings.cache_ttl_seconds)
        self.stats = RunUsage(root_model=settings.lm, sub_model=settings.effective_sub_lm)
        self.budget = Budget(self.stats, max_cost=settings.max_cost, max_tokens=settings.max_tokens,
                             time_limit=settings.time_limit, started=self.started)
        self.stats.budget = self.budget
        if self.budget.unpriced_models():
            raise RunFailed(f"max_cost cannot be enforced: LiteLLM's price table has no price for "
                            f"{', '.join(self.budget.unpriced_models())}")
        self.trace = TrajectoryLog(self.client, self.run_id, self.stats, ttl_seconds=self.base.result_expires)
        try:
            tools = load_tools(spec.tools)  # before any sandbox or LM call: a bad tool costs nothing
        except ToolLoadError as exc:
            raise RunFailed(str(exc)) from None
        inputs = get_blobs(self.client, spec.inputs)
        registry = LeaseRegistry(self.client, self.base.lease_ttl)
        self.keeper = LeaseKeeper(registry, run_id=self.run_id, owner=self.owner, on_tick=self._tick).start()
        local = {"isolation": settings.local_isolation.value} if settings.sandbox is SandboxBackend.LOCAL else {}
        factory = interpreter_factory(
            settings.sandbox.value, execution_timeout=settings.execution_timeout,
            tool_wait_limit=self.base.run_time_limit,
            labels={"rlmq.run": self.run_id},
            on_sandbox_created=self._sandbox_created, on_sandbox_destroyed=self.keeper.destroyed, **local,
        )
        fanout = Fanout(settings, app=self.task.app, options=spec.options, observer=self.stats,
                        should_stop=self.cancelled.is_set, run_id=self.run_id)
        rlm = TracedRLM(spec.signature, fanout=fanout, tools=tools, max_iters=settings.max_iters,
                        max_llm_calls=settings.max_llm_calls, interpreter_factory=factory,
                        trace=self.trace, budget=self.budget, on_code=lambda: self.publish(force=True))
        lm = fleet_root_lm(settings)
        self.stats.watch_root(lm)
        self.publish(force=True)
        with dspy.context(lm=lm, callbacks=[_IterationCallback(self, action_predictor(rlm))]):
            prediction = rlm(**inputs)
        if self.cancelled.is_set():
            raise RunCancelled()
        return {
            "run_id": self.run_id,
            "outputs": {name: _jsonable(getattr(prediction, name, None)) for name in rlm.signature.output_fields},
            "final_reasoning": _jsonable(getattr(prediction, "final_reasoning", None)),
            "trajectory": _jsonable(getattr(prediction, "trajectory", [])),
            "steps": self.trace.steps,
        }

    def _ended_badly(self, exc: BaseException) -> dict[str, Any]:
        progress = self.progress()
        if self.fenced.is_set():
            logger.warning("run %s: attempt %d was superseded; it stops without writing", self.run_id, self.attempt)
            raise Ignore()
        if self.trace is not None:
            self.trace.expire(self.base.result_expires)
        if isinstance(exc, (RunCancelled, FanoutCancelled)) or self.store.cancel_requested(self.run_id):
            self.store.finish(self.run_id, RunStatus.CANCELLED, error="cancelled", progress=progress,
                              attempt=self.attempt)
            self._mark_revoked()
            raise Ignore()  # the REVOKED state above must stand
        if self.budget is not None and (isinstance(exc, BudgetExceeded) or self.budget.tripped):
            reason = f"budget exceeded: {self.budget.tripped or exc}"
            logger.warning("run %s stopped: %s", self.run_id, reason)
            self.store.finish(self.run_id, RunStatus.STOPPED, error=one_line(reason), progress=progress,
                              attempt=self.attempt)
            raise RunFailed(one_line(reason)) from None
        if not isinstance(exc, Exception):
            # KeyboardInterrupt, SystemExit: the worker itself is stopping. Let the claim lapse
            # now, so the recovery sweep restarts the run elsewhere instead of failing it.
            self.store.renew_claim(self.run_id, self.attempt, self.owner, 0.001)
            raise exc
        if isinstance(exc, SoftTimeLimitExceeded):
            message = f"time limit: the run took longer than {self.base.run_time_limit:g}s"
        elif isinstance(exc, RunFailed):
            message = str(exc)
        else:
            message = f"{type(exc).__name__}: {exc}"
        logger.error("run %s failed: %s", self.run_id, message, exc_info=exc)
        detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])[-4000:]
        line = one_line(message)
        if not _when_redis_is_back(lambda: self.store.finish(
                self.run_id, RunStatus.FAILED, error=line, error_detail=f"{message}\n\n{detail}", progress=progress,
                attempt=self.attempt)):
            raise Ignore()
        raise RunFailed(line) from None

    def _mark_revoked(self) -> None:
        """REVOKED as Celery itself stores it (an exception record ``AsyncResult`` can read), and the
        final ``task-revoked`` event that ends the task in Flower."""
        try:
            self.task.backend.mark_as_revoked(self.run_id, reason="cancelled", request=self.task.request)
            with self.task.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                dispatcher.send("task-revoked", uuid=self.run_id, terminated=True, signum=None, expired=False)
        except Exception:
            logger.exception("could not record run %s as revoked in Celery", self.run_id)

    # -- progress and cancellation ------------------------------------------------------------
    def progress(self) -> Progress:
        return self.stats.progress(iteration=self.iteration, max_iters=self.max_iters,
                                   elapsed=time.monotonic() - self.started, sandbox=self.sandbox)

    def _sandbox_created(self, info: Any) -> None:
        """Lease the sandbox, and keep what isolates it in the record ("process" is no boundary)."""
        assert self.keeper is not None
        self.keeper.created(info)
        self.sandbox = RunSandbox(backend=info.backend, id=info.sandbox_id, isolation=info.isolation)
        if info.isolation == "process":
            logger.warning("run %s: its local sandbox is plain processes (RLMQ_LOCAL_ISOLATION=process), "
                           "no security boundary", self.run_id)
        self.publish(force=True)

    def publish(self, *, force: bool = False) -> None:
        """Report progress to the result backend, Flower (event) and the run record."""
        with self._publish_lock:
            meta = self.progress()
            counts = (meta.llm_calls, meta.cache_hits)
            now = time.monotonic()
            if not force and (counts == self._last_counts or now - self._last_publish < _PUBLISH_EVERY):
                return
            self._last_publish, self._last_counts = now, counts
            try:
                if not self.store.set_progress(self.run_id, meta, attempt=self.attempt):
                    return  # superseded or finished: Celery's state is no longer ours to write
                publish_progress(self.task, self.run_id, self.hostname, meta, started_at=self.started_wall)
                count(self.client, [("subcalls", counts[0] - self._counted[0]),
                                    ("cache_hits", counts[1] - self._counted[1])])
                self._counted = counts
            except Exception:  # monitoring must never break the run
                logger.exception("could not publish progress of run %s", self.run_id)

    def _tick(self) -> None:
        if not self.fenced.is_set() and not self.store.renew_claim(self.run_id, self.attempt, self.owner,
                                                                   self.base.lease_ttl):
            logger.warning("run %s: attempt %d lost its claim (restarted elsewhere or finished); stopping it",
                           self.run_id, self.attempt)
            self.fenced.set()
            self.cancelled.set()
            if self.keeper is not None:
                self.keeper.destroy_all()
            return
        if not self.cancelled.is_set() and self.store.cancel_requested(self.run_id):
            logger.warning("run %s: cancel requested; deleting its sandbox", self.run_id)
            self.cancelled.set()
            if self.keeper is not None:
                self.keeper.destroy_all()
        if self.budget is not None and not self.budget.tripped:
            try:
                self.budget.check_time()
            except BudgetExceeded as exc:  # a step may run long: stop it now, as a cancel does
                logger.warning("run %s: %s; deleting its sandbox", self.run_id, exc)
                if self.keeper is not None:
                    self.keeper.destroy_all()
        self.publish()


def _when_redis_is_back(write: Callable[[], bool]) -> bool:
    """A final write, tried again while Redis restarts (else the finished work would be replayed)."""
    deadline = time.monotonic() + _OUTAGE_GRACE
    while True:
        try:
            return write()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def one_line(text: str, limit: int = 300) -> str:
    """An error for a status line: whitespace (newlines included) collapsed, at most ``limit`` chars."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"



def _jsonable(value: Any) -> Any:
    """Outputs may be pydantic models, tuples, sets...; JSON gets plain structures."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _jsonable(dump(mode="json"))
    return str(value)
