"""The run engine: one RLM run in one worker process, from its spec to its recorded end.

:class:`RunExecution` puts the parts together in order: the claim (:mod:`workers.claim`), the
run's 1-s tick (:mod:`workers.run_ticker`), the operator's pins, the budget and trajectory, the
sandbox leases, the RLM under the root LM, progress (:mod:`workers.progress_publisher`) and the
outcome table (:mod:`workers.outcomes`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, NoReturn

import dspy
from celery.exceptions import Ignore
from pydantic_core import to_jsonable_python

from broker_bridge import interpreter_factory
from rlmq.run_options import check_tools, with_options
from rlmq.run_send import send_run_task
from rlmq.settings import SandboxBackend, Settings, SettingsError
from rlmq.store.metrics import add_usage
from rlmq.store.records import Progress, RunRecord, RunSpec, RunStatus, RunStore
from rlmq.tree import read_tree
from workers.budget import Budget
from workers.children import RLM_QUERY_INSTRUCTIONS, Children, InProcessTask
from workers.claim import RunClaim
from workers.context import redis_client, worker_settings
from workers.dspy_cache import install_redis_dspy_cache
from workers.dspy_private import action_predictor
from workers.engines import fleet_root_lm
from workers.fanout import Fanout
from workers.job_feeder import feed_after_run
from workers.log_format import log_context
from workers.monitor import summary_line
from workers.outcomes import CeleryEnd, RunCancelled, RunFailed, ending_of, mark_revoked, record_restart
from workers.progress_publisher import IterationCallback, ProgressPublisher
from workers.rlm import TracedRLM
from workers.run_inputs import load_run_inputs
from workers.run_ticker import RunTicker
from workers.sandbox_registry import LeaseKeeper, LeaseRegistry, attempt_labels
from workers.tracing import NULL_SPANS, RunSpans, root_lm_callback, run_spans
from workers.trajectory import TrajectoryLog
from workers.tree_budget import TreeBudget, TreeRefused
from workers.usage import RunUsage
from workers.user_tools import ToolLoadError, load_tools

__all__ = ["RunExecution", "sandbox_ttl_minutes"]

logger = logging.getLogger(__name__)

SANDBOX_TTL_MARGIN_MINUTES = 10  # a boot (3 min at most) and the deletion after the run's last step


class RunExecution:
    """One run inside one worker process."""

    def __init__(self, task: Any, run_id: str) -> None:
        self.task, self.run_id, self.hostname = task, run_id, str(task.request.hostname or "")
        self.base = worker_settings()
        self.client = redis_client()
        self.store = RunStore(self.client, expire_seconds=self.base.result_expires)
        self.claim = RunClaim(self.client, run_id, worker=self.hostname, ttl_seconds=self.base.lease_ttl)
        self.progress = ProgressPublisher(task, run_id, hostname=self.hostname, claim=self.claim, client=self.client)
        self.leases = LeaseKeeper(LeaseRegistry(self.client, self.base.lease_ttl), run_id=run_id,
                                  owner=self.claim.owner)
        self.ticker = RunTicker(run_id, claim=self.claim, leases=self.leases, progress=self.progress)
        self.trace: TrajectoryLog | None = None
        self.spans: RunSpans = NULL_SPANS  # the attempt's OpenTelemetry spans, when traced
        self.children: Children | None = None  # a run below its tree's max_depth starts child runs

    def run(self) -> dict[str, Any]:
        record = self.store.get(self.run_id)
        if record is None:
            raise RunFailed(f"run {self.run_id} has no spec in Redis (was it submitted through rlmq?)")
        try:
            return self._run(record)
        finally:  # however it ended, the job's next runs start now (not at the next maintenance sweep)
            if record.spec.job:
                feed_after_run(self.client, self.task.app, record.spec.job, self.run_id)

    def _run(self, record: RunRecord) -> dict[str, Any]:
        if record.status.finished or not self.claim.take():
            logger.warning("run %s is already %s or owned elsewhere: not executing it twice",
                           self.run_id, record.status.value)
            raise Ignore()  # store no state: the owner's state must stand
        if self.claim.attempt > 1:
            logger.warning("run %s: attempt %d, replaying through the caches (%s)", self.run_id,
                           self.claim.attempt, record.restart_reason or "restarted")
        self.spans = run_spans(self.run_id, self.claim.attempt, record.spec.signature, record.spec.traceparent or None)
        self.ticker.root_id = record.spec.root_id  # cancelling the root cancels this run too
        with log_context(self.run_id, self.claim.attempt, self.spans):  # RLMQ_LOG_FORMAT=json lines name the run
            logger.info("run %s: attempt %d starts", self.run_id, self.claim.attempt)
            self.ticker.start()
            try:
                result = self._execute(record.spec)
            except BaseException as exc:
                self._ended_badly(exc)
            finally:
                if self.children is not None:
                    self.children.close()
                if self.ticker.tree is not None:
                    self.ticker.tree.release_sandbox()
                    if self.ticker.budget is not None:  # what this node paid counts for the rest of the tree
                        self.ticker.tree.charge(*self.ticker.budget.usage.paid())  # (its estimate released)
                self.ticker.stop()
                self.leases.stop()
                self.leases.close("the run ended", booting=True)  # normally empty: DSPy shut the interpreter down
                if self.trace is not None:
                    self.trace.expire(self.base.result_expires)
            return self._succeeded(result)

    def _execute(self, spec: RunSpec) -> dict[str, Any]:
        try:  # the operator's pins, before any sandbox or LM call (the client may not know them)
            settings = with_options(self.base, spec.options)
            check_tools(self.base, spec.tools)
            tools = load_tools(spec.tools)
        except (SettingsError, ToolLoadError) as exc:
            raise RunFailed(str(exc)) from None
        if self.store.cancel_requested(self.run_id, spec.root_id):
            raise RunCancelled()
        install_redis_dspy_cache(self.client, settings.cache_ttl_seconds)
        tree = self.ticker.tree = self._tree(spec, settings)
        stats = RunUsage(root_model=settings.lm, sub_model=settings.effective_sub_lm,
                         meter=lambda added, sub: add_usage(self.client, added, subcalls=sub))
        budget = self.ticker.budget = stats.budget = _budget(stats, settings, started=self.progress.started,
                                                             worker_time_limit=self.base.run_time_limit, tree=tree)
        budget.check_tree()  # a child of a tree that stopped never starts a sandbox
        self.progress.stats, self.progress.max_iters = stats, settings.max_iters
        self.trace = TrajectoryLog(self.client, self.run_id, stats, ttl_seconds=self.base.result_expires)
        inputs, stored_inputs = load_run_inputs(self.client, spec.inputs)
        self.leases.start()
        labels = attempt_labels(self.run_id, self.claim.attempt)  # what recovery reaps a dead attempt's by
        factory = _sandboxes(settings, self.base.run_time_limit, labels=labels, stored_inputs=stored_inputs,
                             on_sandbox_creating=self._sandbox_creating, on_sandbox_created=self._sandbox_created,
                             on_sandbox_destroyed=self._sandbox_destroyed)
        fanout = Fanout(settings, app=self.task.app, options=spec.options, observer=stats,
                        should_stop=self.ticker.cancelled.is_set, run_id=self.run_id)
        fanout.spans = self.spans
        tools = [self.spans.wrap_tool(tool) for tool in tools]  # a span per call, when traced
        if tree is not None and spec.depth + 1 < settings.max_depth:
            self.children = Children(spec, client=self.client, store=self.store, app=self.task.app,
                                     run_child=self._run_child, should_stop=self.ticker.cancelled.is_set, tree=tree,
                                     current_step=lambda: self.trace.steps + 1 if self.trace is not None else 0,
                                     help_after=settings.child_help_after,
                                     on_query=lambda: tree.step_size(*_last_root_call(stats)))
        if settings.max_depth > 1:  # the model reads the built-ins' use in its instructions
            factory.execution_instructions = factory.execution_instructions + RLM_QUERY_INSTRUCTIONS
        rlm = TracedRLM(spec.signature, fanout=fanout, tools=tools, max_iters=settings.max_iters,
                        max_llm_calls=settings.max_llm_calls, interpreter_factory=factory,
                        rlm_tools=tree is not None, children=self.children,
                        tree_reserve=tree.reserve_calls if tree is not None else None,
                        trace=self.trace, budget=budget, on_code=lambda: self.progress.publish(force=True),
                        spans=self.spans)
        lm = fleet_root_lm(settings)
        stats.watch_root(lm)
        self.progress.publish(force=True)
        callbacks = [IterationCallback(self.progress, action_predictor(rlm))]
        if self.spans is not NULL_SPANS:
            callbacks.append(root_lm_callback(self.spans))
        with dspy.context(lm=lm, callbacks=callbacks):
            prediction = rlm(**inputs)
        if self.ticker.cancelled.is_set() and not self.ticker.handing_back.is_set():
            raise RunCancelled()  # (a run handed back after its last step has its result: it ends here)
        budget.check_tree()  # an answer built while the tree ran out is not the tree's answer: STOPPED
        return _result_document(self.run_id, prediction, list(rlm.signature.output_fields), self.trace.steps)

    def _succeeded(self, result: dict[str, Any]) -> dict[str, Any]:
        progress = self.progress.close()
        document = progress.to_json_dict()
        if self.children is not None:  # the tree's usage, its children's (finished) included
            tree = read_tree(self.store, self.run_id)
            if tree is not None and tree.children:
                result["tree_usage"] = tree.usage(own=progress.usage).to_json_dict()
        if not self.store.finish(self.run_id, RunStatus.SUCCEEDED, progress=progress, attempt=self.claim.attempt,
                                 result={**result, "progress": document, "usage": document["usage"]}):
            logger.warning("run %s: attempt %d was superseded; its result is dropped", self.run_id, self.claim.attempt)
            self.spans.end("SUPERSEDED", progress.usage)
            raise Ignore()
        self.spans.end(RunStatus.SUCCEEDED.value, progress.usage)
        return _task_result(self.run_id, progress)

    def _ended_badly(self, exc: BaseException) -> NoReturn:
        """Record the run's end by the outcome table, then end the Celery task as the table says."""
        if self.claim.fenced.is_set():
            logger.warning("run %s: attempt %d was superseded; it stops without writing", self.run_id,
                           self.claim.attempt)
            self.spans.end("SUPERSEDED")
            raise Ignore()
        end = ending_of(exc, cancel_requested=self.store.cancel_requested(self.run_id, self.ticker.root_id),
                        budget_tripped=self.ticker.budget.tripped if self.ticker.budget is not None else None,
                        time_limit=self.base.run_time_limit,
                        handing_back=(f"handed back: worker {self.hostname} is shutting down"
                                      if self.ticker.handing_back.is_set() else None))
        logger.log(end.outcome.log_level, "run %s ends %s: %s", self.run_id,
                   end.outcome.status.value if end.outcome.status else "unrecorded", end.message,
                   exc_info=end.exc if end.outcome.traceback else None)
        if end.outcome.celery is CeleryEnd.HANDBACK:
            self._hand_back(end.line)
        if end.outcome.status is None:  # CeleryEnd.REQUEUE: the worker stops; the sweep restarts the run
            self.claim.lapse()
            self.spans.end("REQUEUED", error=end.line)
            raise end.exc
        progress = self.progress.close()
        self.spans.end(end.outcome.status.value, progress.usage, error=end.line)
        if not self.store.finish(self.run_id, end.outcome.status, error=end.line, error_detail=end.detail,
                                 progress=progress, attempt=self.claim.attempt):
            logger.warning("run %s: attempt %d no longer owns the run; its end is not recorded", self.run_id,
                           self.claim.attempt)
            raise Ignore()  # superseded, or ended by the recovery sweep: Celery's state is not ours to write
        if end.outcome.celery is CeleryEnd.REVOKED:
            mark_revoked(self.task.app, self.run_id, hostname=self.hostname, request=self.task.request)
            raise Ignore()  # the REVOKED state above must stand
        raise RunFailed(end.line) from None

    def _hand_back(self, reason: str) -> NoReturn:
        """Queue the run again as its next attempt, now, for a worker that is not shutting down (it
        resumes by replay); Celery shows it as RETRY, as a restart by the recovery sweep."""
        self.spans.end("HANDED_BACK", error=reason)
        if self.claim.hand_back(reason):
            self.progress.close()
            send_run_task(self.task.app, self.run_id)
            record_restart(self.task.app, self.run_id, reason)
        else:
            logger.warning("run %s: attempt %d no longer owns the run; nothing to hand back", self.run_id,
                           self.claim.attempt)
        raise Ignore()

    def _run_child(self, run_id: str) -> None:
        """A child run no worker claimed, executed here (``workers.children``) and ended in Celery as a task would."""
        backend = self.task.app.backend
        try:
            result = RunExecution(InProcessTask(self.task.app, hostname=self.hostname, run_id=run_id), run_id).run()
        except RunFailed as exc:
            backend.mark_as_failure(run_id, exc)
            raise
        backend.store_result(run_id, result, "SUCCESS")

    def _tree(self, spec: RunSpec, settings: Settings) -> TreeBudget | None:
        """The run's tree's budget when it may have children or is one (``max_depth`` > 1)."""
        if settings.max_depth <= 1:
            return None
        try:
            return TreeBudget(self.client, spec, settings, lease_seconds=self.base.lease_ttl,
                              expire_seconds=self.base.result_expires)
        except TreeRefused as exc:
            raise RunFailed(str(exc)) from None

    def _sandbox_creating(self, info: Any) -> None:
        if self.ticker.tree is not None:  # max_sandboxes: wait for the tree's slot first
            self.ticker.tree.take_sandbox(self.ticker.cancelled.is_set)
        self.leases.creating(info)

    def _sandbox_destroyed(self, info: Any) -> None:
        self.leases.destroyed(info)
        if self.ticker.tree is not None:
            self.ticker.tree.release_sandbox()

    def _sandbox_created(self, info: Any) -> None:
        self.leases.created(info)
        self.progress.sandbox_created(info)


def _last_root_call(stats: RunUsage) -> tuple[int, int]:
    """The size of the run's latest root-LM call, accounted first (its children's first steps are estimated by it)."""
    stats.sync_root()
    return stats.last_root_call


def _budget(stats: RunUsage, settings: Settings, *, started: float, worker_time_limit: float,
            tree: TreeBudget | None) -> Budget:
    time_limit = tree.time_left(settings.time_limit) if tree is not None else settings.time_limit
    budget = Budget(stats, max_cost=settings.max_cost, max_tokens=settings.max_tokens,
                    time_limit=time_limit, started=started, worker_time_limit=worker_time_limit)
    if tree is not None:
        budget.tree_stopped, budget.on_trip = tree.stopped, tree.trip
        budget.tree_charge, budget.tree_step = tree.charge, tree.step_size
    if budget.unpriced_models():
        raise RunFailed(f"max_cost cannot be enforced: LiteLLM's price table has no price for "
                        f"{', '.join(budget.unpriced_models())}")
    return budget


def _sandboxes(settings: Settings, run_time_limit: float, **hooks: Any) -> Any:
    """The interpreter factory of the run's sandboxes (``hooks``: labels and the lease callbacks)."""
    backend: dict[str, Any]
    if settings.sandbox is SandboxBackend.LOCAL:
        backend = {"isolation": settings.local_isolation.value}
    else:  # Daytona deletes the sandbox at its TTL even if every reaper is gone
        backend = {"ttl_minutes": sandbox_ttl_minutes(settings.time_limit, run_time_limit),
                   "boot_timeout": settings.daytona_boot_timeout}
    return interpreter_factory(settings.sandbox.value, execution_timeout=settings.execution_timeout,
                               tool_wait_limit=run_time_limit, **hooks, **backend)


def sandbox_ttl_minutes(time_limit: float | None, run_time_limit: float) -> int:
    """A Daytona sandbox's wall-clock cap: the run's time limit (its own, else the worker's) plus the
    boot and cleanup margin; one attempt never outlives it."""
    limit = min(time_limit, run_time_limit) if time_limit else run_time_limit
    return math.ceil(limit / 60) + SANDBOX_TTL_MARGIN_MINUTES


def _result_document(run_id: str, prediction: Any, output_fields: list[str], steps: int) -> dict[str, Any]:
    """The stored result; outputs may be pydantic models, tuples, sets...: JSON gets plain values."""
    return to_jsonable_python({
        "run_id": run_id, "outputs": {name: getattr(prediction, name, None) for name in output_fields},
        "final_reasoning": getattr(prediction, "final_reasoning", None),
        "trajectory": getattr(prediction, "trajectory", []), "steps": steps}, fallback=str)


def _task_result(run_id: str, progress: Progress) -> dict[str, Any]:
    """What Celery stores and Flower shows as the result: the summary first (Flower cuts long reprs)."""
    brief = {k: v for k, v in progress.to_json_dict().items() if k not in ("usage", "llm_workers")}
    return {"run_id": run_id, "status": RunStatus.SUCCEEDED.value, "summary": summary_line(progress), **brief}
