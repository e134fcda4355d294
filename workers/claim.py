"""Who runs a run: one execution's claim on it, the fence on every write it makes, and recovery.

A run's hash holds its ``attempt`` (1 for the first start). The execution running attempt ``n``
claims ``keys.run_owner_key`` with the value ``"n|owner"`` and renews it every second; every write
of its progress and of its end carries ``n`` and is checked in Lua (``workers/lua/run_*.lua``,
``rlmq/store/lua/run_finish.lua``). Once the recovery sweep has moved the run to attempt ``n+1``,
every write of attempt ``n`` is refused, so an owner that was only cut off (a partition, a stalled
process) can never overwrite what the new attempt does; its next renewal fails and it stops.

These operations are the workers' alone: the client's ``RunStore`` reads records, creates runs and
cancels queued ones, nothing more.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import redis

from rlmq.store import keys
from rlmq.store.lua import lua_scripts
from rlmq.store.records import Progress, RunStatus

__all__ = ["Recovery", "Renewal", "RunClaim", "recover", "resend_if_lost"]

_LUA = lua_scripts("workers")


class Recovery(str, Enum):
    """What the recovery sweep did with one active run."""

    RESTART = "restart"  #: QUEUED again as the next attempt: send ``run_rlm``
    FAILED = "failed"  #: its worker died during the last allowed attempt
    CANCELLED = "cancelled"  #: its worker died after a cancel was asked for
    NOTHING = ""  #: alive, queued, or finished


@dataclass(frozen=True)
class Renewal:
    """A tick's one look at Redis: whether the claim is still held, a cancel asked for, the worker draining."""

    held: bool
    cancel_requested: bool = False
    draining: bool = False


class RunClaim:
    """One execution's hold on a run. ``attempt`` is 0 until :meth:`take` succeeds; ``fenced`` is set
    once a renewal found the run moved on without this execution."""

    def __init__(self, client: redis.Redis, run_id: str, *, worker: str, ttl_seconds: float) -> None:
        self.redis = client
        self.run_id = run_id
        self.worker = worker
        # Unique per execution, so a retried claim is recognised as ours and a second delivery of the
        # run to the same process is not; sandbox leases name it too (``workers.sandbox_registry``).
        self.owner = f"{worker}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.ttl_ms = int(ttl_seconds * 1000)
        self.attempt = 0
        self.fenced = threading.Event()

    def take(self) -> int:
        """Claim the run if it is QUEUED and nobody holds it: the attempt, or 0 (not ours to run)."""
        self.attempt = int(_LUA.run(self.redis, "run_claim", self._keys(keys.runs_active_key(), keys.runs_queued_key()), {
            "run_id": self.run_id, "owner": self.owner, "worker": self.worker, "ttl_ms": self.ttl_ms,
            "now": repr(time.time())}))
        return self.attempt

    def renew(self, ttl_ms: int | None = None) -> bool:
        """Extend the claim; False (and ``fenced`` set) once the run has moved on without this attempt."""
        return bool(self._renew([], self.ttl_ms if ttl_ms is None else ttl_ms))

    def tick(self, cancel_of: Iterable[str]) -> Renewal:
        """Renew the claim and read the cancel marks of ``cancel_of`` and this worker's draining mark,
        in one round trip (the tick of every run in the process does this once a second)."""
        out = self._renew([keys.worker_draining_key(self.worker), *{keys.run_cancel_key(r) for r in cancel_of}],
                          self.ttl_ms)
        return Renewal(held=bool(out), cancel_requested=bool(out & 2), draining=bool(out & 4))

    def _renew(self, watched: list[str], ttl_ms: int) -> int:
        """``run_renew.lua``: 0 once fenced off (``fenced`` set then), else 1 plus the flags of ``watched``."""
        if self.fenced.is_set():
            return 0
        out = int(_LUA.run(self.redis, "run_renew", self._keys(*watched),
                           {"attempt": self.attempt, "owner": self.owner, "ttl_ms": ttl_ms}))
        if not out:
            self.fenced.set()
        return out

    def lapse(self) -> None:
        """Let the claim expire now (the worker is stopping), so the sweep restarts the run elsewhere."""
        self.renew(ttl_ms=1)

    def hand_back(self, reason: str) -> bool:
        """Put the run back in the queue as its next attempt (this worker is shutting down); False if
        this attempt no longer owns it. Not charged against the run's attempts."""
        handed = bool(_LUA.run(self.redis, "run_handback", self._keys(keys.runs_active_key(), keys.runs_queued_key()), {
            "run_id": self.run_id, "attempt": self.attempt, "owner": self.owner, "now": repr(time.time()),
            "reason": reason}))
        self.fenced.set()  # either way, this attempt writes nothing more
        return handed

    def write_progress(self, progress: Progress) -> bool:
        """Store the run's progress; False once this attempt no longer runs it."""
        return bool(_LUA.run(self.redis, "run_progress", [keys.run_key(self.run_id)], {"attempt": self.attempt},
                             json.dumps(progress.to_json_dict(), allow_nan=False)))

    def _keys(self, *more: str) -> list[str]:
        return [keys.run_key(self.run_id), keys.run_owner_key(self.run_id), *more]


def recover(client: redis.Redis, run_id: str, *, max_attempts: int, lease_seconds: float) -> Recovery:
    """Restart, fail or cancel a run whose owner stopped renewing its claim (one Lua script, so any
    number of sweepers may ask at once)."""
    out = _LUA.run(client, "run_recover", [keys.run_key(run_id), keys.run_owner_key(run_id), keys.runs_active_key(),
                                           keys.run_cancel_key(run_id), keys.runs_queued_key()], {
        "run_id": run_id, "now": repr(time.time()), "max_attempts": max_attempts, "lease_s": f"{lease_seconds:g}",
        "finished": {s.value: True for s in RunStatus if s.finished}})
    return Recovery(out.decode() if isinstance(out, bytes) else str(out or ""))


def resend_if_lost(client: redis.Redis, run_id: str, *, stale_before: float) -> bool:
    """Whether to send ``run_rlm`` again for a run still QUEUED since before ``stale_before`` (its
    message was lost; ``run_resend.lua``): True for exactly one caller, which must send it."""
    return bool(_LUA.run(client, "run_resend", [keys.run_key(run_id), keys.runs_queued_key()], {
        "run_id": run_id, "now": repr(time.time()), "stale_before": repr(stale_before)}))
