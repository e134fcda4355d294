"""Leases on live sandboxes, so that none outlives its run.

A run registers a lease per sandbox before the backend creates it (``keys.lease_key(sandbox_id)``
holds the JSON record; ``keys.leases_index_key()`` scores sandbox ids by lease expiry), renews it
while it works (a :class:`LeaseKeeper`), and releases it when the sandbox is destroyed. If the
worker dies, even mid-boot, the lease stops being renewed and ``reap_expired`` (the maintenance
sweep) destroys the sandbox with ``broker_bridge.destroy_sandbox``, where the lease says it lives
(``provider``: a Daytona API URL and target, never a key). The run also records those places
(``keys.run_sandbox_homes_key``), so recovery can delete an attempt's sandboxes by label
(``reap_attempt``) even when no lease names them.

A local sandbox is a process tree on one host, so only a reaper on that host may reap it;
Daytona sandboxes can be reaped from anywhere. A reaper claims a lease with ``ZREM`` (exactly
one reaper gets 1), so two reapers never destroy the same sandbox twice.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import redis

from broker_bridge import BackendName, SandboxInfo, destroy_sandbox, reap_labelled
from rlmq.store import keys, replies
from workers.ticker import Ticker

__all__ = ["ATTEMPT_LABEL", "RUN_LABEL", "LeaseKeeper", "LeaseRegistry", "SandboxLease", "attempt_labels",
           "reap_attempt", "reap_expired"]

logger = logging.getLogger(__name__)

_RECORD_TTL_SECONDS = 7 * 24 * 3600  # garbage guard only: the index decides expiry
RUN_LABEL = "rlmq.run"
ATTEMPT_LABEL = "rlmq.attempt"


def attempt_labels(run_id: str, attempt: int) -> dict[str, str]:
    """The labels on every sandbox of one attempt of a run: what recovery reaps it by."""
    return {RUN_LABEL: run_id, ATTEMPT_LABEL: str(attempt)}


@dataclass(frozen=True)
class SandboxLease:
    backend: str
    sandbox_id: str
    host: str
    run_id: str
    owner: str
    expires_at: float
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    provider: dict[str, str] = field(default_factory=dict)  # where it lives (Daytona: api_url, target)

    def info(self) -> SandboxInfo:
        return SandboxInfo(backend=BackendName(self.backend), sandbox_id=self.sandbox_id, labels=dict(self.labels),
                           host=self.host, provider=dict(self.provider))

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> SandboxLease:
        raw = json.loads(data)
        return cls(backend=str(raw["backend"]), sandbox_id=str(raw["sandbox_id"]), host=str(raw["host"]),
                   run_id=str(raw["run_id"]), owner=str(raw["owner"]), expires_at=float(raw["expires_at"]),
                   labels={str(k): str(v) for k, v in (raw.get("labels") or {}).items()},
                   created_at=float(raw.get("created_at") or 0.0),
                   provider={str(k): str(v) for k, v in (raw.get("provider") or {}).items()})


class LeaseRegistry:
    """Register, renew and release sandbox leases in Redis."""

    def __init__(self, client: redis.Redis, ttl_seconds: float) -> None:
        self.redis = client
        self.ttl = ttl_seconds

    def register(self, info: SandboxInfo, *, run_id: str, owner: str) -> SandboxLease:
        lease = SandboxLease(backend=info.backend, sandbox_id=info.sandbox_id, host=info.host, run_id=run_id,
                             owner=owner, expires_at=time.time() + self.ttl, labels=dict(info.labels),
                             provider=dict(info.provider))
        home = json.dumps({"backend": lease.backend, "provider": lease.provider}, sort_keys=True)
        pipe = self.redis.pipeline()
        pipe.set(keys.lease_key(info.sandbox_id), lease.to_json(), ex=_RECORD_TTL_SECONDS)
        pipe.zadd(keys.leases_index_key(), {info.sandbox_id: lease.expires_at})
        pipe.sadd(keys.run_sandbox_homes_key(run_id), home)
        pipe.expire(keys.run_sandbox_homes_key(run_id), _RECORD_TTL_SECONDS)
        pipe.execute()
        return lease

    def renew(self, sandbox_id: str) -> bool:
        """Push the expiry out by ``ttl``; False if the lease is gone (released or reaped)."""
        return bool(self.redis.zadd(keys.leases_index_key(), {sandbox_id: time.time() + self.ttl}, xx=True, ch=True))

    def release(self, sandbox_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.zrem(keys.leases_index_key(), sandbox_id)
        pipe.delete(keys.lease_key(sandbox_id))
        pipe.execute()

    def live(self) -> list[str]:
        return replies.members(self.redis.zrange(keys.leases_index_key(), 0, -1))

    def homes(self, run_id: str) -> list[tuple[str, dict[str, str]]]:
        """Each (backend, provider) the run's sandboxes were registered in."""
        found = (json.loads(m) for m in self.redis.smembers(keys.run_sandbox_homes_key(run_id)))
        return sorted((str(h["backend"]), {str(k): str(v) for k, v in h["provider"].items()}) for h in found)


def reap_attempt(client: redis.Redis, run_id: str, attempt: int) -> int:
    """Delete every sandbox labelled with this attempt of the run, wherever the run registered
    sandboxes: for recovery, once the attempt is known dead. This finds what no lease names any
    more (a create that completed after its lease was reaped) and is idempotent with the lease
    reaper; how many were deleted."""
    deleted = 0
    for backend, provider in LeaseRegistry(client, 0).homes(run_id):
        try:
            deleted += reap_labelled(backend, attempt_labels(run_id, attempt), provider)
        except Exception:  # one unreachable provider must not stop the sweep
            logger.exception("could not reap the sandboxes of run %s attempt %d (%s)", run_id, attempt, backend)
    if deleted:
        logger.warning("reaped %d orphaned sandbox(es) of run %s attempt %d", deleted, run_id, attempt)
    return deleted


def reap_expired(client: redis.Redis, now: float, *, host: str | None = None,
                 destroy: Callable[[SandboxInfo], None] = destroy_sandbox) -> list[SandboxLease]:
    """Destroy the sandboxes whose lease expired before ``now`` that this host may reap."""
    host = host or socket.gethostname()
    index = keys.leases_index_key()
    reaped: list[SandboxLease] = []
    for sandbox_id in replies.members(client.zrangebyscore(index, "-inf", now)):
        raw = client.get(keys.lease_key(sandbox_id))
        lease = SandboxLease.from_json(raw) if raw else None
        if lease is not None and lease.backend == "local" and lease.host != host:
            continue  # another host's process tree: its own reaper handles it
        if lease is not None and _claimed_by(client, lease):
            continue  # its owner still holds the run (the lease lapsed while Redis was away): it renews it
        if not client.zrem(index, sandbox_id):
            continue  # another reaper claimed it first
        client.delete(keys.lease_key(sandbox_id))
        if lease is None:
            continue
        try:
            destroy(lease.info())
            reaped.append(lease)
            logger.warning("reaped sandbox %s of run %s (lease expired)", sandbox_id, lease.run_id)
        except Exception:  # one broken sandbox must not stop the sweep
            logger.exception("could not destroy sandbox %s", sandbox_id)
    return reaped


def _claimed_by(client: redis.Redis, lease: SandboxLease) -> bool:
    """True while the lease's owner still holds its run's claim (``"<attempt>|<owner>"``)."""
    held = client.get(keys.run_owner_key(lease.run_id)) if lease.run_id else None
    return bool(held) and (held.decode() if isinstance(held, bytes) else str(held)).endswith("|" + lease.owner)


class LeaseKeeper:
    """The leases of one run's sandboxes, renewed every ``ttl/3`` (at least every second) by a
    :class:`~workers.ticker.Ticker`. ``creating``/``created``/``destroyed`` are the interpreter
    factory's sandbox hooks. Once :meth:`close` ran (a cancel, a lost claim, the run's end) it refuses
    new sandboxes: one whose boot was under way when the run stopped is destroyed as it arrives."""

    def __init__(self, registry: LeaseRegistry, *, run_id: str, owner: str) -> None:
        self.registry = registry
        self.run_id = run_id
        self.owner = owner
        self._held: dict[str, SandboxInfo] = {}
        self._booting: set[str] = set()  # leased, boot not reported back (a failed one: until the run's end)
        self._lock = threading.Lock()
        self._closed: str | None = None  # why no sandbox may start any more
        self._ticker = Ticker(f"leases-{run_id[:8]}", max(1.0, registry.ttl / 3), self.renew)

    def creating(self, info: SandboxInfo) -> None:
        """Lease the sandbox before it exists, so a worker killed mid-boot leaves it to a reaper."""
        with self._lock:
            self._refuse_if_closed(info)
        self.registry.register(info, run_id=self.run_id, owner=self.owner)  # raising, it creates nothing
        with self._lock:  # closed meanwhile: ``created`` refuses it
            self._held[info.sandbox_id] = info
            self._booting.add(info.sandbox_id)

    def created(self, info: SandboxInfo) -> None:
        with self._lock:
            self._booting.discard(info.sandbox_id)
            self._refuse_if_closed(info)  # the interpreter destroys it, then calls ``destroyed``
            self._held[info.sandbox_id] = info
        self.registry.register(info, run_id=self.run_id, owner=self.owner)

    def _refuse_if_closed(self, info: SandboxInfo) -> None:
        if self._closed is not None:
            raise RuntimeError(f"run {self.run_id} is stopping ({self._closed}): sandbox {info.sandbox_id} "
                               "may not start")

    def destroyed(self, info: SandboxInfo) -> None:
        with self._lock:
            self._held.pop(info.sandbox_id, None)
            self._booting.discard(info.sandbox_id)
        self.registry.release(info.sandbox_id)

    def held(self) -> list[SandboxInfo]:
        with self._lock:
            return list(self._held.values())

    def renew(self) -> None:
        for info in self.held():
            self.registry.renew(info.sandbox_id)

    def start(self) -> LeaseKeeper:
        self._ticker.start()
        return self

    def stop(self) -> None:
        self._ticker.stop()

    def close(self, why: str, *, booting: bool = False) -> None:
        """Refuse any further sandbox, then destroy and release every booted one still held; with
        ``booting``, also those whose boot never reported back (only once no boot can be in flight:
        deleting a sandbox mid-create would hold its boot until the boot timeout)."""
        with self._lock:
            self._closed = self._closed or why
            doomed = [info for info in self._held.values() if booting or info.sandbox_id not in self._booting]
        for info in doomed:
            try:
                destroy_sandbox(info)
            except Exception:
                logger.exception("could not destroy sandbox %s", info.sandbox_id)
            self.destroyed(info)
