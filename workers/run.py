"""The run engine: one RLM run inside one worker process, from spec to result.

``tasks.runs.run_rlm`` hands its Celery task to :class:`RunExecution`, which loads the spec and
inputs from Redis, claims ownership (``SET NX``: a second delivery of the same run id does not
execute), builds :class:`~workers.fanout.FleetRLM` on the sandbox
interpreter factory (sandboxes labelled ``rlmq.run=<id>`` and leased), runs it inside
``dspy.context(lm=root_lm)`` with the Redis-backed ``dspy.cache``, stores result and
trajectory, and always releases its sandbox. Every ending is recorded: SUCCEEDED, CANCELLED,
or FAILED with the error text; the exception that Celery sees is a plain ``RunFailed``.

Progress: a dspy callback on the RLM's action predictor marks each iteration, and the lease
keeper's 1-s tick republishes sub-call counters, both through ``_publish`` (``update_state
("PROGRESS")``, a ``task-progress`` event for Flower, and the run record). Cancellation: a flag in
Redis seen by the tick (which then deletes the sandbox at once, so the next execute fails) and by
the fan-out's gather loop (which revokes its sub-tasks).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import dspy
from celery import states
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from dspy.utils.callback import BaseCallback

from broker_bridge import interpreter_factory
from rlmq.blobs import get_blobs
from rlmq.records import RunSpec, RunStatus, RunStore
from rlmq.settings import Settings
from workers.cache import install_redis_dspy_cache
from workers.context import redis_client, worker_settings
from workers.fanout import Fanout, FanoutCancelled, FanoutStats, FleetRLM
from workers.root_lm import fleet_root_lm
from workers.sandbox_registry import LeaseKeeper, LeaseRegistry
from workers.user_tools import ToolLoadError, load_tools

__all__ = ["RunCancelled", "RunExecution", "RunFailed", "root_lm"]

logger = logging.getLogger(__name__)



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
        raw = str((inputs.get("kwargs") or inputs).get("iteration", ""))
        head = raw.split("/", 1)[0].strip()
        if head.isdigit():
            self.execution.iteration = int(head)
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
        self.stats = FanoutStats()
        self.cancelled = threading.Event()
        self.iteration = 0
        self.max_iters = 0
        self.started = time.monotonic()
        self._publish_lock = threading.Lock()
        self._last_publish = 0.0
        self._last_counts: tuple[int, int] = (0, 0)
        self.keeper: LeaseKeeper | None = None

    def run(self) -> dict[str, Any]:
        record = self.store.get(self.run_id)
        if record is None:
            raise RunFailed(f"run {self.run_id} has no spec in Redis (was it submitted through rlmq?)")
        if record.status.finished or not self.store.claim(self.run_id, self.owner, self.base.lease_ttl):
            logger.warning("run %s is already %s or owned elsewhere: not executing it twice",
                           self.run_id, record.status.value)
            raise Ignore()  # store no state: the owner's state must stand
        try:
            result = self._execute(record.spec)
        except BaseException as exc:
            return self._ended_badly(exc)
        finally:
            if self.keeper is not None:
                self.keeper.stop()
                self.keeper.destroy_all()  # normally empty: DSPy shut the interpreter down
        progress = self.progress()
        self.store.finish(self.run_id, RunStatus.SUCCEEDED, result={**result, "progress": progress},
                          progress=progress)
        return {"run_id": self.run_id, "status": RunStatus.SUCCEEDED.value, **progress}

    def _execute(self, spec: RunSpec) -> dict[str, Any]:
        settings = self.base.with_options(spec.options)
        self.max_iters = settings.max_iters
        if self.store.cancel_requested(self.run_id):
            raise RunCancelled()
        self.store.mark_running(self.run_id, self.hostname)
        install_redis_dspy_cache(self.client, settings.cache_ttl_seconds)
        try:
            tools = load_tools(spec.tools)  # before any sandbox or LM call: a bad tool costs nothing
        except ToolLoadError as exc:
            raise RunFailed(str(exc)) from None
        inputs = get_blobs(self.client, spec.inputs)
        registry = LeaseRegistry(self.client, self.base.lease_ttl)
        self.keeper = LeaseKeeper(registry, run_id=self.run_id, owner=self.owner, on_tick=self._tick).start()
        factory = interpreter_factory(
            settings.sandbox.value, execution_timeout=settings.execution_timeout,
            labels={"rlmq.run": self.run_id},
            on_sandbox_created=self.keeper.created, on_sandbox_destroyed=self.keeper.destroyed,
        )
        fanout = Fanout(settings, app=self.task.app, options=spec.options, stats=self.stats,
                        should_stop=self.cancelled.is_set)
        rlm = FleetRLM(spec.signature, fanout=fanout, tools=tools, max_iters=settings.max_iters,
                       max_llm_calls=settings.max_llm_calls, interpreter_factory=factory)
        self.publish(force=True)
        with dspy.context(lm=root_lm(settings), callbacks=[_IterationCallback(self, rlm.generate_action)]):
            prediction = rlm(**inputs)
        if self.cancelled.is_set():
            raise RunCancelled()
        return {
            "run_id": self.run_id,
            "outputs": {name: _jsonable(getattr(prediction, name, None)) for name in rlm.signature.output_fields},
            "final_reasoning": _jsonable(getattr(prediction, "final_reasoning", None)),
            "trajectory": _jsonable(getattr(prediction, "trajectory", [])),
        }

    def _ended_badly(self, exc: BaseException) -> dict[str, Any]:
        progress = self.progress()
        if isinstance(exc, (RunCancelled, FanoutCancelled)) or self.store.cancel_requested(self.run_id):
            self.store.finish(self.run_id, RunStatus.CANCELLED, error="cancelled", progress=progress)
            self.task.update_state(task_id=self.run_id, state=states.REVOKED, meta={"reason": "cancelled"})
            raise Ignore()
        if isinstance(exc, SoftTimeLimitExceeded):
            message = f"time limit: the run took longer than {self.base.run_time_limit:g}s"
        elif isinstance(exc, RunFailed):
            message = str(exc)
        else:
            message = f"{type(exc).__name__}: {exc}"
        logger.error("run %s failed: %s", self.run_id, message, exc_info=exc)
        self.store.finish(self.run_id, RunStatus.FAILED, error=message, progress=progress)
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt, SystemExit: the worker itself is stopping
        raise RunFailed(message) from None

    # -- progress and cancellation ------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "max_iters": self.max_iters,
                "elapsed": round(time.monotonic() - self.started, 3), **self.stats.snapshot()}

    def publish(self, *, force: bool = False) -> None:
        """Report progress to the result backend, Flower (event) and the run record."""
        with self._publish_lock:
            meta = self.progress()
            counts = (meta["llm_calls"], meta["cache_hits"])
            now = time.monotonic()
            if not force and (counts == self._last_counts or now - self._last_publish < _PUBLISH_EVERY):
                return
            self._last_publish, self._last_counts = now, counts
            try:
                self.task.update_state(task_id=self.run_id, state="PROGRESS", meta=meta)
                with self.task.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                    dispatcher.send("task-progress", uuid=self.run_id, state="PROGRESS", **meta)
                self.store.set_progress(self.run_id, meta)
            except Exception:  # monitoring must never break the run
                logger.exception("could not publish progress of run %s", self.run_id)

    def _tick(self) -> None:
        self.store.renew_claim(self.run_id, self.owner, self.base.lease_ttl)
        if not self.cancelled.is_set() and self.store.cancel_requested(self.run_id):
            logger.warning("run %s: cancel requested; deleting its sandbox", self.run_id)
            self.cancelled.set()
            if self.keeper is not None:
                self.keeper.destroy_all()
        self.publish()


def root_lm(settings: Settings) -> dspy.LM:
    """The run's root LM: ``dspy.cache`` (Redis-backed in workers), then the fleet's limiter for
    the model, shared with every other run and with the sub-calls (``workers.root_lm``)."""
    return fleet_root_lm(settings)


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
