"""Typed run records and their home in Redis.

``RunSpec`` is what a client submits (inputs as blob digests, never the data itself);
``RunStatus`` the life of a run; ``Progress`` what the worker running it reports (with its
``Usage``: root-LM and sub-LLM calls, tokens and dollars, one ``CallUsage`` per kind).
``RunStore`` reads and writes the run record, a Redis hash under ``keys.run_key(run_id)`` (one
field per concern, so progress updates never rewrite the spec), the final result under
``keys.run_result_key``, and the submit-time index ``keys.runs_index_key``. Everything is JSON.

The worker running a run claims it and fences its writes by the attempt number (``workers.claim``);
only the final write, which a client's cancel of a queued run shares, is here
(``rlmq/store/lua/run_finish.lua``).
"""

from __future__ import annotations

import builtins
import json
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from rlmq.store import keys, metrics, replies
from rlmq.store.lua import lua_scripts

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["Batch", "CallUsage", "Progress", "RunRecord", "RunSandbox", "RunSpec", "RunStatus", "RunStore", "Usage",
           "new_run_id"]


class RunStatus(str, Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    STOPPED = "STOPPED"  # a budget (max_cost, max_tokens, time_limit) ended it; the error says which

    @property
    def finished(self) -> bool:
        return self in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.STOPPED)


def new_run_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class RunSpec:
    """One RLM run as submitted: the signature, input blob refs and per-run options.

    ``options`` holds per-run overrides of :class:`rlmq.settings.Settings` fields (the names in
    ``rlmq.settings.RUN_OPTIONS``, applied by ``rlmq.run_options``).
    """

    run_id: str
    signature: str
    inputs: dict[str, str]  # input name -> sha256 of the blob in keys.blob_key
    options: dict[str, Any] = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.time)
    tools: list[str] = field(default_factory=list)  # "package.module:function", imported by the worker
    job: str = ""  # the corpus job this run answers one item of (rlmq.store.jobs), "" for a lone run
    item: int = -1  # that item's index in the job
    traceparent: str = ""  # the submitter's active trace (W3C traceparent), which the run's spans join
    # A child run (started by its parent's sandbox code through rlm_query): its parent, the tree's root, its level
    parent: str = ""
    root: str = ""
    depth: int = 0
    parent_step: int = 0  # the parent's step (from 1) whose code started it

    @property
    def root_id(self) -> str:
        """The run at the top of this run's tree (itself for a root)."""
        return self.root or self.run_id

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> RunSpec:
        raw = json.loads(data)
        return cls(
            run_id=str(raw["run_id"]),
            signature=str(raw["signature"]),
            inputs={str(k): str(v) for k, v in raw["inputs"].items()},
            options=dict(raw.get("options") or {}),
            submitted_at=float(raw.get("submitted_at") or 0.0),
            tools=[str(t) for t in raw.get("tools") or []],
            job=str(raw.get("job") or ""),
            item=int(raw.get("item", -1)),
            traceparent=str(raw.get("traceparent") or ""),
            parent=str(raw.get("parent") or ""),
            root=str(raw.get("root") or ""),
            depth=int(raw.get("depth") or 0),
            parent_step=int(raw.get("parent_step") or 0),
        )


# -- what the worker running a run reports ----------------------------------------------------
# Dataclasses rather than TypedDicts: readers use attributes (a misspelt name fails loudly instead
# of reading a .get default), the derived numbers (totals, the live sub-call count) are computed in
# one place, and each JSON document is written by one to_json_dict and read by one from_json_dict.


Flat = TypeVar("Flat", bound="DataclassInstance")


def _from_json_fields(cls: type[Flat], raw: dict[str, Any]) -> Flat:
    """A flat dataclass whose fields all have defaults, from JSON: known fields only, each coerced
    to its default's type (a record written by an older version lacks the newer fields)."""
    default = cls()
    return cls(**{f.name: type(getattr(default, f.name))(raw[f.name]) for f in fields(cls)
                  if raw.get(f.name) is not None})


@dataclass
class CallUsage:
    """Counters of one kind of LM call: the root LM's, the sub-calls', or both (``Usage.total``).

    Two prices, from LiteLLM's table: ``cost_paid`` is what the provider billed (a cache hit costs
    nothing), ``cost_uncached`` what the same calls would have cost without the cache.
    """

    model: str = ""  # "" for a sum over two models
    calls: int = 0
    cache_hits: int = 0
    errors: int = 0
    input_tokens: int = 0  # every call's tokens, cached or not (what they would be without the cache)
    output_tokens: int = 0
    paid_input_tokens: int = 0
    paid_output_tokens: int = 0
    cost_paid: float = 0.0
    cost_uncached: float = 0.0
    unpriced_calls: int = 0  # calls whose model LiteLLM's table does not price
    seconds: float = 0.0  # wall time spent waiting for these calls

    @property
    def priced(self) -> bool:
        return self.unpriced_calls == 0

    @property
    def paid_tokens(self) -> int:
        return self.paid_input_tokens + self.paid_output_tokens

    def count(self, *, input_tokens: int, output_tokens: int, cost: float | None, cached: bool,
              ok: bool = True) -> None:
        """Count one call; ``cost`` is its uncached price, None when its model has none."""
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

    def plus(self, other: CallUsage) -> CallUsage:
        return CallUsage(model=self.model if self.model == other.model else "",
                         **{name: getattr(self, name) + getattr(other, name) for name in _COUNTERS})

    def minus(self, before: CallUsage) -> CallUsage:
        """What was counted since ``before`` (a copy of this group taken earlier)."""
        return CallUsage(model=self.model, **{name: getattr(self, name) - getattr(before, name) for name in _COUNTERS})

    def to_json_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cost_paid": round(self.cost_paid, 8), "cost_uncached": round(self.cost_uncached, 8),
                "seconds": round(self.seconds, 3)}

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> CallUsage:
        return _from_json_fields(cls, raw)


_COUNTERS = tuple(f.name for f in fields(CallUsage) if f.name != "model")


@dataclass
class Usage:
    """What a run used: its root-LM calls and its sub-LLM calls, each with its model."""

    root: CallUsage = field(default_factory=CallUsage)
    sub: CallUsage = field(default_factory=CallUsage)

    @property
    def total(self) -> CallUsage:
        return self.root.plus(self.sub)

    def to_json_dict(self) -> dict[str, Any]:
        """``{"root": ..., "sub": ..., "total": ...}``; ``total`` (documented in the README) has no
        model and says ``priced``: False if some call's model has no price."""
        total = self.total
        summed = {k: v for k, v in total.to_json_dict().items() if k != "model"}
        return {"root": self.root.to_json_dict(), "sub": self.sub.to_json_dict(),
                "total": {**summed, "priced": total.priced}}

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> Usage:
        return cls(root=CallUsage.from_json_dict(raw.get("root") or {}),
                   sub=CallUsage.from_json_dict(raw.get("sub") or {}))


@dataclass(frozen=True)
class Batch:
    """The fan-out batch in flight (summed over the run's concurrent tool calls)."""

    total: int = 0  # prompts sent
    done: int = 0  # answered so far
    cache_hits: int = 0

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> Batch:
        return _from_json_fields(cls, raw)


@dataclass(frozen=True)
class RunSandbox:
    """The sandbox a run's code executes in."""

    backend: str = ""  # rlmq.settings.SandboxBackend's value: "local" or "daytona"
    id: str = ""  # the backend's sandbox id (its lease in workers.sandbox_registry, its name at Daytona)
    # What stands between the code and the host: "vm", "namespaces", or "process" (no security boundary)
    isolation: str = ""

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> RunSandbox:
        return _from_json_fields(cls, raw)


@dataclass
class Progress:
    """What the worker running a run reports: kept in the run record (``rlmq status``), sent as the
    Celery state's meta and to Flower (``workers.monitor``), and stored with the result."""

    iteration: int = 0  # the RLM step under way, from 1
    max_iters: int = 0  # 0 until the worker has applied the run's options
    elapsed: float = 0.0  # seconds since this attempt started
    usage: Usage = field(default_factory=Usage)  # finished calls
    batch: Batch | None = None  # the fan-out batch in flight; its answers are not in usage yet
    llm_workers: dict[str, int] = field(default_factory=dict)  # sub-calls answered, per llm worker
    subtasks_resent: int = 0  # sub-tasks sent again because their worker died
    sandbox: RunSandbox | None = None  # once it exists

    @property
    def llm_calls(self) -> int:
        """Sub-calls answered, the batch in flight's included."""
        return self.usage.sub.calls + (self.batch.done if self.batch else 0)

    @property
    def cache_hits(self) -> int:
        """Sub-calls answered from the response cache, the batch in flight's included."""
        return self.usage.sub.cache_hits + (self.batch.cache_hits if self.batch else 0)

    @property
    def llm_errors(self) -> int:
        return self.usage.sub.errors

    @property
    def cost_usd(self) -> float:
        """Dollars paid so far, root and sub-calls."""
        return self.usage.total.cost_paid

    def to_json_dict(self) -> dict[str, Any]:
        # The flat sub-call numbers ride along for readers of flat fields (Flower's event fields,
        # AsyncResult(run_id).info); from_json_dict recomputes them.
        return {"iteration": self.iteration, "max_iters": self.max_iters, "elapsed": round(self.elapsed, 3),
                "llm_calls": self.llm_calls, "cache_hits": self.cache_hits, "llm_errors": self.llm_errors,
                "cost_usd": round(self.cost_usd, 8), "subtasks_resent": self.subtasks_resent,
                "llm_workers": dict(self.llm_workers),
                "batch": None if self.batch is None else self.batch.to_json_dict(), "usage": self.usage.to_json_dict(),
                "sandbox": None if self.sandbox is None else self.sandbox.to_json_dict()}

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> Progress:
        return cls(iteration=int(raw.get("iteration") or 0), max_iters=int(raw.get("max_iters") or 0),
                   elapsed=float(raw.get("elapsed") or 0.0), usage=Usage.from_json_dict(raw.get("usage") or {}),
                   batch=Batch.from_json_dict(raw["batch"]) if raw.get("batch") else None,
                   llm_workers={str(k): int(v) for k, v in (raw.get("llm_workers") or {}).items()},
                   subtasks_resent=int(raw.get("subtasks_resent") or 0),
                   sandbox=RunSandbox.from_json_dict(raw["sandbox"]) if raw.get("sandbox") else None)


@dataclass
class RunRecord:
    """What Redis knows about a run (the spec plus everything that happened to it)."""

    spec: RunSpec
    status: RunStatus
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None  # one line; the details (a traceback's tail) are in error_detail
    progress: Progress = field(default_factory=Progress)  # as last reported by the worker running it
    attempt: int = 1  # 1 for the first start; restarts on another worker count up
    restarts: list[dict[str, Any]] = field(default_factory=list)  # {at, attempt, reason} per restart
    error_detail: str | None = None

    @property
    def restart_reason(self) -> str | None:
        return str(self.restarts[-1].get("reason")) if self.restarts else None

    def to_json(self) -> str:
        out = asdict(self)
        out["status"] = self.status.value
        out["progress"] = self.progress.to_json_dict()
        return json.dumps(out, allow_nan=False)

    @classmethod
    def from_hash(cls, fields: dict[bytes, bytes]) -> RunRecord:
        def get(name: str) -> str | None:
            value = fields.get(name.encode())
            return value.decode() if value is not None else None

        def num(name: str) -> float | None:
            value = get(name)
            return float(value) if value else None

        return cls(
            spec=RunSpec.from_json(get("spec") or "{}"),
            status=RunStatus(get("status") or RunStatus.QUEUED.value),
            worker=get("worker") or None,
            started_at=num("started_at"),
            finished_at=num("finished_at"),
            error=get("error") or None,
            progress=Progress.from_json_dict(json.loads(get("progress") or "{}")),
            attempt=int(get("attempt") or 1),
            restarts=list(json.loads(get("restarts") or "[]")),
            error_detail=get("error_detail") or None,
        )


class RunStore:
    """Run records in Redis; every write is a single command or one pipeline."""

    def __init__(self, client: redis.Redis, *, expire_seconds: int | None = None) -> None:
        self.redis = client
        self.expire_seconds = expire_seconds

    def create(self, spec: RunSpec) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(keys.run_key(spec.run_id), mapping={"spec": spec.to_json(), "status": RunStatus.QUEUED.value})
        pipe.zadd(keys.runs_index_key(), {spec.run_id: spec.submitted_at})
        pipe.zadd(keys.runs_queued_key(), {spec.run_id: time.time()})
        pipe.execute()

    def create_once(self, spec: RunSpec) -> bool:
        """``create`` unless the run exists already (a job's run fed again after a crash): True if created."""
        pipe = self.redis.pipeline()  # MULTI: a reader never sees the spec without a status
        pipe.hsetnx(keys.run_key(spec.run_id), "spec", spec.to_json())
        pipe.hsetnx(keys.run_key(spec.run_id), "status", RunStatus.QUEUED.value)
        pipe.zadd(keys.runs_index_key(), {spec.run_id: spec.submitted_at}, nx=True)
        pipe.zadd(keys.runs_queued_key(), {spec.run_id: time.time()}, nx=True)
        return bool(pipe.execute()[0])

    def create_child(self, spec: RunSpec) -> bool:
        """Record a child run unless it exists (a replayed parent re-attaches to its children): True if created."""
        if not self.redis.hsetnx(keys.run_key(spec.run_id), "spec", spec.to_json()):
            return False
        pipe = self.redis.pipeline()
        pipe.hsetnx(keys.run_key(spec.run_id), "status", RunStatus.QUEUED.value)
        pipe.zadd(keys.runs_index_key(), {spec.run_id: spec.submitted_at})
        pipe.zadd(keys.runs_queued_key(), {spec.run_id: time.time()})
        pipe.zadd(keys.run_children_key(spec.parent), {spec.run_id: spec.submitted_at})
        pipe.execute()
        return True

    def children(self, run_id: str) -> builtins.list[str]:
        """The run's child runs, in the order they were started."""
        return replies.members(self.redis.zrange(keys.run_children_key(run_id), 0, -1))

    def get(self, run_id: str) -> RunRecord | None:
        fields = replies.raw_hash(self.redis.hgetall(keys.run_key(run_id)))
        if not fields or b"spec" not in fields:
            return None
        return RunRecord.from_hash(fields)

    def status(self, run_id: str) -> RunStatus | None:
        raw = self.redis.hget(keys.run_key(run_id), "status")
        return RunStatus(replies.text(raw)) if raw else None

    def finish(self, run_id: str, status: RunStatus, *, result: dict[str, Any] | None = None,
               error: str | None = None, error_detail: str | None = None, progress: Progress | None = None,
               attempt: int | None = None, expect: RunStatus | None = None) -> bool:
        """Record the end of a run: status, error text, last progress, and the result document.

        Refused (False) if the run has finished already, if ``attempt`` is given and is no longer the
        run's, or if ``expect`` is given and is not its status (e.g. cancelling only a QUEUED run).
        """
        named: dict[str, Any] = {
            "run_id": run_id, "status": status.value, "finished_at": repr(time.time()), "error": error or "",
            "error_detail": error_detail or "", "finished": {s.value: True for s in RunStatus if s.finished},
            "buckets": list(metrics.DURATION_BUCKETS),
        }
        if attempt is not None:
            named["attempt"] = attempt
        if expect is not None:
            named["expect"] = expect.value
        if self.expire_seconds:
            named["expire_s"] = self.expire_seconds
        return bool(lua_scripts("rlmq.store").run(
            self.redis, "run_finish",
            [keys.run_key(run_id), keys.run_result_key(run_id), keys.run_owner_key(run_id), keys.runs_active_key(),
             keys.metric_key(metrics.RUNS), keys.metric_key(metrics.RUN_DURATION)],
            named, "" if progress is None else json.dumps(progress.to_json_dict(), allow_nan=False),
            "" if result is None else json.dumps(result, allow_nan=False, default=str)))

    def result(self, run_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(keys.run_result_key(run_id))
        return json.loads(raw) if raw else None

    def list(self, limit: int = 50, *, start: int = 0) -> list[str]:
        """Most recent run ids first (from the ``start``-th)."""
        return replies.members(self.redis.zrevrange(keys.runs_index_key(), start, start + limit - 1))

    def active(self) -> builtins.list[str]:  # ``list`` here is the method above
        """Runs that were started (or restarted) and have not finished."""
        return replies.members(self.redis.zrange(keys.runs_active_key(), 0, -1))

    # cancellation
    def request_cancel(self, run_id: str, ttl_seconds: int = 7 * 24 * 3600) -> None:
        self.redis.set(keys.run_cancel_key(run_id), repr(time.time()), ex=ttl_seconds)

    def cancel_requested(self, *run_ids: str) -> bool:
        """Whether a cancel was asked for any of ``run_ids`` (a run and its tree's root: cancelling a root
        cancels its tree)."""
        return bool(self.redis.exists(*{keys.run_cancel_key(run_id) for run_id in run_ids}))
