"""Typed run records and their home in Redis.

``RunSpec`` is what a client submits (inputs as blob digests, never the data itself);
``RunStatus`` the life of a run; ``RunStore`` reads and writes the run record, a Redis hash
under ``keys.run_key(run_id)`` (one field per concern, so progress updates never rewrite the
spec), the final result under ``keys.run_result_key``, and the submit-time index
``keys.runs_index_key``. Everything is JSON.

Writes by the worker running a run are fenced by its attempt number (``rlmq.store.run_scripts``): a
run restarted on another worker can never be overwritten by its previous owner.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import redis

from rlmq.store import keys, run_scripts

__all__ = ["RunRecord", "RunSpec", "RunStatus", "RunStore", "new_run_id"]


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
        )


@dataclass
class RunRecord:
    """What Redis knows about a run (the spec plus everything that happened to it)."""

    spec: RunSpec
    status: RunStatus
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None  # one line; the details (a traceback's tail) are in error_detail
    progress: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1  # 1 for the first start; restarts on another worker count up
    restarts: list[dict[str, Any]] = field(default_factory=list)  # {at, attempt, reason} per restart
    error_detail: str | None = None

    @property
    def restart_reason(self) -> str | None:
        return str(self.restarts[-1].get("reason")) if self.restarts else None

    def to_json(self) -> str:
        out = asdict(self)
        out["status"] = self.status.value
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
            progress=json.loads(get("progress") or "{}"),
            attempt=int(get("attempt") or 1),
            restarts=list(json.loads(get("restarts") or "[]")),
            error_detail=get("error_detail") or None,
        )


class RunStore:
    """Run records in Redis; every write is a single command or one pipeline."""

    def __init__(self, client: redis.Redis, *, expire_seconds: int | None = None) -> None:
        self.redis = client
        self.expire_seconds = expire_seconds
        self._claim = client.register_script(run_scripts.CLAIM)
        self._renew = client.register_script(run_scripts.RENEW)
        self._progress = client.register_script(run_scripts.SET_PROGRESS)
        self._finish = client.register_script(run_scripts.FINISH)
        self._recover = client.register_script(run_scripts.RECOVER)

    def create(self, spec: RunSpec) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(keys.run_key(spec.run_id), mapping={"spec": spec.to_json(), "status": RunStatus.QUEUED.value})
        pipe.zadd(keys.runs_index_key(), {spec.run_id: spec.submitted_at})
        pipe.execute()

    def get(self, run_id: str) -> RunRecord | None:
        fields = self.redis.hgetall(keys.run_key(run_id))
        if not fields or b"spec" not in fields:
            return None
        return RunRecord.from_hash(fields)

    def status(self, run_id: str) -> RunStatus | None:
        raw = self.redis.hget(keys.run_key(run_id), "status")
        return RunStatus(raw.decode()) if raw else None

    def set_progress(self, run_id: str, progress: dict[str, Any], *, attempt: int) -> bool:
        """Store progress if ``attempt`` still runs the run; False once it was fenced off."""
        return bool(self._progress(keys=[keys.run_key(run_id)], args=[attempt, json.dumps(progress, allow_nan=False)]))

    def finish(self, run_id: str, status: RunStatus, *, result: dict[str, Any] | None = None,
               error: str | None = None, error_detail: str | None = None, progress: dict[str, Any] | None = None,
               attempt: int | None = None, expect: RunStatus | None = None) -> bool:
        """Record the end of a run: status, error text, last progress, and the result document.

        Refused (False) if the run has finished already, if ``attempt`` is given and is no longer the
        run's, or if ``expect`` is given and is not its status (e.g. cancelling only a QUEUED run).
        """
        args = [
            "" if attempt is None else attempt, "" if expect is None else expect.value, status.value,
            repr(time.time()), error or "", error_detail or "",
            "" if progress is None else json.dumps(progress, allow_nan=False),
            "" if result is None else json.dumps(result, allow_nan=False, default=str),
            self.expire_seconds or "", run_id,
        ]
        return bool(self._finish(keys=[keys.run_key(run_id), keys.run_result_key(run_id), keys.run_owner_key(run_id),
                                       keys.runs_active_key()], args=args))

    def result(self, run_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(keys.run_result_key(run_id))
        return json.loads(raw) if raw else None

    def list(self, limit: int = 50) -> list[str]:
        """Most recent run ids first."""
        return [r.decode() for r in self.redis.zrevrange(keys.runs_index_key(), 0, limit - 1)]

    # ownership, fencing, recovery and cancellation
    def claim(self, run_id: str, owner: str, ttl_seconds: float, *, worker: str) -> int:
        """Take a QUEUED run and mark it RUNNING: the attempt number, or 0 if it is not ours to run."""
        return int(self._claim(keys=[keys.run_key(run_id), keys.run_owner_key(run_id), keys.runs_active_key()],
                               args=[owner, int(ttl_seconds * 1000), worker, repr(time.time()), run_id]))

    def renew_claim(self, run_id: str, attempt: int, owner: str, ttl_seconds: float) -> bool:
        """Extend this attempt's claim; False once the run has moved on without it (it must stop)."""
        return bool(self._renew(keys=[keys.run_key(run_id), keys.run_owner_key(run_id)],
                                args=[attempt, owner, int(ttl_seconds * 1000)]))

    def active(self) -> list[str]:
        """Runs that were started (or restarted) and have not finished."""
        return [r.decode() for r in self.redis.zrange(keys.runs_active_key(), 0, -1)]

    def recover(self, run_id: str, *, max_attempts: int, lease_seconds: float, resend_after: float) -> str:
        """Restart a run whose owner stopped renewing its claim: 'restart', 'resend', 'failed', 'cancelled' or ''."""
        out = self._recover(keys=[keys.run_key(run_id), keys.run_owner_key(run_id), keys.runs_active_key(),
                                  keys.run_cancel_key(run_id)],
                            args=[run_id, repr(time.time()), max_attempts, f"{lease_seconds:g}", resend_after])
        return out.decode() if isinstance(out, bytes) else str(out or "")

    def request_cancel(self, run_id: str, ttl_seconds: int = 7 * 24 * 3600) -> None:
        self.redis.set(keys.run_cancel_key(run_id), repr(time.time()), ex=ttl_seconds)

    def cancel_requested(self, run_id: str) -> bool:
        return bool(self.redis.exists(keys.run_cancel_key(run_id)))
