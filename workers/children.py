"""Child runs: ``rlm_query`` / ``rlm_query_batched`` from sandbox code start RLM runs on the fleet.

A child is a run like any other (a record, a ``run_rlm`` task on the ``rlm`` queue, its own sandbox),
with the signature ``task: str, context -> answer: str``, the root's options and tools, and its
parent, root and depth in its spec. Its id is ``{parent id}.{call index}``, so a parent resumed by
replay (whose code makes the same calls in the same order) finds its children instead of starting
them again, and a finished child answers at once.

No deadlock: a parent that waits for a child no worker has claimed after ``help_after`` seconds
(``RLMQ_CHILD_HELP_AFTER``, 0.5 by default) runs
it itself, in a thread of its own process (``run_child``). The claim is one fenced Lua script
(``workers.claim``), so exactly one executor wins; the loser's copy ends as "owned elsewhere". A tree
therefore needs no free slot below its root: every waiting parent is also a worker for its children.

A child that fails (or is cancelled, or stopped) answers ``[ERROR] ...``, as a failed ``llm_query`` does.
A parent that stops waiting cancels its children only when a cancel was asked for it or its root: a
parent fenced off by a newer attempt of itself leaves them to that attempt, which re-attaches.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import redis
from celery.exceptions import Ignore

from rlmq.flower_repr import describe_inputs, task_reprs
from rlmq.run_send import send_run_task
from rlmq.store import keys, replies
from rlmq.store.blobs import put_blobs
from rlmq.store.records import RunRecord, RunSpec, RunStatus, RunStore
from workers.budget import BudgetExceeded
from workers.tree_budget import TreeBudget

__all__ = ["CHILD_SIGNATURE", "RLM_QUERY_INSTRUCTIONS", "Children", "InProcessTask", "child_run_id",
           "prompt_of"]

logger = logging.getLogger(__name__)

CHILD_SIGNATURE = "task: str, context -> answer: str"
POLL_SECONDS = 0.1  # how often a waiting parent reads its children's status (one pipeline)

RLM_QUERY_INSTRUCTIONS = """
Child runs:
- `rlm_query(task, context=None)` - start a child RLM (its own REPL and sandbox) on `task` with any
  JSON `context`; returns its answer string. Use it for subtasks that need their own exploration.
- `rlm_query_batched(tasks, contexts=None)` - child runs for several tasks at once, answers in order.
A failed child answers "[ERROR] ..."."""


def child_run_id(parent_id: str, index: int) -> str:
    """The run id of a parent's ``index``-th child (from 0): the same on every replay of the parent."""
    return f"{parent_id}.{index}"


def prompt_of(task: str, context: Any) -> str:
    """What ``rlm_query`` sends as an ``llm_query`` prompt at the deepest level."""
    return task if context is None else f"{task}\n\nContext:\n{json.dumps(context, ensure_ascii=False)}"


def check_request(tasks: Any, contexts: Any) -> list[Any]:
    """The contexts (one per task), or TypeError/ValueError in one line for sandbox code."""
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise TypeError("rlm_query takes a non-empty task string (rlm_query_batched: a list of them)")
    if contexts is None:
        contexts = [None] * len(tasks)
    if not isinstance(contexts, list) or len(contexts) != len(tasks):
        raise ValueError(f"rlm_query_batched: {len(tasks)} task(s) need as many contexts (or none)")
    for context in contexts:
        try:
            json.dumps(context, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"a child run's context must be a JSON value: {exc}") from None
    return list(contexts)


class InProcessTask:
    """What :class:`workers.run_engine.RunExecution` uses of its Celery task, for a child run a waiting
    parent executes in a thread of its own process (no Celery request behind it)."""

    def __init__(self, app: Any, *, hostname: str, run_id: str) -> None:
        self.app = app
        self.request = SimpleNamespace(hostname=hostname, id=run_id)

    def update_state(self, task_id: str, state: str, meta: dict[str, Any]) -> None:
        self.app.backend.store_result(task_id, meta, state)


class Children:
    """One run's child runs: started in call order, waited for, helped, cancelled with the run."""

    def __init__(self, parent: RunSpec, *, client: redis.Redis, store: RunStore, app: Any,
                 run_child: Callable[[str], None], should_stop: Callable[[], bool], tree: TreeBudget,
                 current_step: Callable[[], int], help_after: float = 0.5,
                 on_query: Callable[[], object] = lambda: None) -> None:
        self.parent = parent
        self.client, self.store, self.app = client, store, app
        self.run_child = run_child  # executes a child run here (RunExecution in this process), claim first
        self.should_stop = should_stop  # the parent's step is being stopped (cancel, lost claim)
        self.tree = tree  # the tree's limits: children, and the reason once it stopped
        self.current_step = current_step  # the parent's step under way (the trace nests children under it)
        self.help_after = help_after  # seconds before an unclaimed child is run here
        self.on_query = on_query  # before children start (the engine notes its step's size for their budgets)
        self._indices = itertools.count()
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def query(self, tasks: Sequence[str], contexts: Sequence[Any]) -> list[str]:
        """The children's answers, in order; never raises for a failed child."""
        self.on_query()
        with self._lock:  # a batch's indices are consecutive even when sandbox threads call at once
            indices = [next(self._indices) for _ in tasks]
        run_ids = [self._start(i, task, context) for i, task, context in zip(indices, tasks, contexts, strict=True)]
        return self._gather(run_ids)

    def close(self) -> None:
        """The parent ended: a wait still under way (its tool call outlived the step) cancels its children."""
        self._closed.set()

    def _start(self, index: int, task: str, context: Any) -> str:
        parent = self.parent
        run_id = child_run_id(parent.run_id, index)
        refs = put_blobs(self.client, {"task": task, "context": context})
        spec = RunSpec(run_id=run_id, signature=CHILD_SIGNATURE, inputs=refs, options=dict(parent.options),
                       tools=list(parent.tools), parent=parent.run_id, root=parent.root_id, depth=parent.depth + 1,
                       parent_step=self.current_step())
        existing = self.store.get(run_id)
        if existing is None:
            self.tree.reserve_child()  # BudgetExceeded: max_children
        if existing is None and self.store.create_child(spec):
            send_run_task(self.app, run_id, parent_id=parent.run_id, root_id=parent.root_id,
                          **task_reprs(spec, describe_inputs({"task": task, "context": context})))
            return run_id
        if existing is not None and existing.spec.inputs != refs:
            logger.warning("run %s: child %s exists for another task (calls in a different order?)", parent.run_id,
                           run_id)
        return run_id

    def _gather(self, run_ids: list[str]) -> list[str]:
        answers: dict[str, str] = {}
        helping: dict[str, threading.Thread] = {}
        since = time.monotonic()
        while len(answers) < len(run_ids):
            if self.should_stop() or self._closed.is_set():
                if self.store.cancel_requested(self.parent.run_id, self.parent.root_id):
                    self._cancel([r for r in run_ids if r not in answers])
                # else (fenced off, handed back, ended otherwise): the children stay for the attempt
                # that re-attaches to them
                return [answers.get(r) or f"[ERROR] child run {r}: its parent stopped waiting" for r in run_ids]
            stopped = self.tree.stopped()
            if stopped is not None:  # the parent stops too (its next step check names the reason)
                raise BudgetExceeded(stopped)
            pending = [r for r in run_ids if r not in answers]
            for run_id, status in zip(pending, self._statuses(pending), strict=True):
                if status is not None and status.finished:
                    answers[run_id] = self._answer(run_id)
                elif (status is RunStatus.QUEUED and time.monotonic() - since >= self.help_after
                      and not (run_id in helping and helping[run_id].is_alive())):  # again after a restart
                    helping[run_id] = self._help(run_id)
            if len(answers) < len(run_ids):
                time.sleep(POLL_SECONDS)
        return [answers[r] for r in run_ids]

    def _statuses(self, run_ids: list[str]) -> list[RunStatus | None]:
        pipe = self.client.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hget(keys.run_key(run_id), "status")
        return [RunStatus(replies.text(raw)) if raw else None for raw in pipe.execute()]

    def _help(self, run_id: str) -> threading.Thread:
        thread = threading.Thread(target=self._run_here, args=(run_id,), name=f"child-{run_id[-16:]}", daemon=True)
        thread.start()
        return thread

    def _run_here(self, run_id: str) -> None:
        try:
            self.run_child(run_id)
        except Ignore:
            pass  # a worker claimed it first (or it ended): its owner records it
        except Exception:  # the run's record says how it ended; a helper thread has no one else to tell
            logger.info("child run %s, run by its waiting parent, ended with an error", run_id, exc_info=True)

    def _answer(self, run_id: str) -> str:
        record = self.store.get(run_id)
        if record is None:
            return f"[ERROR] child run {run_id} has no record"
        if record.status is RunStatus.SUCCEEDED:
            result = self.store.result(run_id) or {}
            answer = (result.get("outputs") or {}).get("answer")
            return answer if isinstance(answer, str) else json.dumps(answer, default=str)
        return failed_answer(record)

    def _cancel(self, run_ids: list[str]) -> None:
        for run_id in run_ids:
            self.store.request_cancel(run_id)
            self.store.finish(run_id, RunStatus.CANCELLED, error="its parent run stopped before it started",
                              expect=RunStatus.QUEUED)


def failed_answer(record: RunRecord) -> str:
    detail = f": {record.error}" if record.error else ""
    return f"[ERROR] child run {record.spec.run_id} ended {record.status.value}{detail}"
