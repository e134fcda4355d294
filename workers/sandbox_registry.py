"""Leases on live sandboxes, so that none outlives its run.

A run registers a lease per sandbox it creates (``keys.lease_key(sandbox_id)`` holds the JSON
record; ``keys.leases_index_key()`` scores sandbox ids by lease expiry), renews it while it
works (a :class:`LeaseKeeper`), and releases it when the sandbox is destroyed. If the
worker dies, the lease stops being renewed and ``reap_expired`` (beat, every worker at start,
and a remote-control broadcast) destroys the sandbox with ``broker_bridge.destroy_sandbox``.

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

from broker_bridge import BackendName, SandboxInfo, destroy_sandbox
from rlmq.store import keys, replies
from workers.ticker import Ticker

__all__ = ["LeaseKeeper", "LeaseRegistry", "SandboxLease", "reap_expired"]

logger = logging.getLogger(__name__)

_RECORD_TTL_SECONDS = 7 * 24 * 3600  # garbage guard only: the index decides expiry


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

    def info(self) -> SandboxInfo:
        return SandboxInfo(backend=BackendName(self.backend), sandbox_id=self.sandbox_id, labels=dict(self.labels), host=self.host)

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> SandboxLease:
        raw = json.loads(data)
        return cls(backend=str(raw["backend"]), sandbox_id=str(raw["sandbox_id"]), host=str(raw["host"]),
                   run_id=str(raw["run_id"]), owner=str(raw["owner"]), expires_at=float(raw["expires_at"]),
                   labels={str(k): str(v) for k, v in (raw.get("labels") or {}).items()},
                   created_at=float(raw.get("created_at") or 0.0))


class LeaseRegistry:
    """Register, renew and release sandbox leases in Redis."""

    def __init__(self, client: redis.Redis, ttl_seconds: float) -> None:
        self.redis = client
        self.ttl = ttl_seconds

    def register(self, info: SandboxInfo, *, run_id: str, owner: str) -> SandboxLease:
        lease = SandboxLease(backend=info.backend, sandbox_id=info.sandbox_id, host=info.host, run_id=run_id,
                             owner=owner, expires_at=time.time() + self.ttl, labels=dict(info.labels))
        pipe = self.redis.pipeline()
        pipe.set(keys.lease_key(info.sandbox_id), lease.to_json(), ex=_RECORD_TTL_SECONDS)
        pipe.zadd(keys.leases_index_key(), {info.sandbox_id: lease.expires_at})
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
    :class:`~workers.ticker.Ticker`. ``created``/``destroyed`` are the interpreter factory's sandbox hooks."""

    def __init__(self, registry: LeaseRegistry, *, run_id: str, owner: str) -> None:
        self.registry = registry
        self.run_id = run_id
        self.owner = owner
        self._held: dict[str, SandboxInfo] = {}
        self._lock = threading.Lock()
        self._ticker = Ticker(f"leases-{run_id[:8]}", max(1.0, registry.ttl / 3), self.renew)

    def created(self, info: SandboxInfo) -> None:
        self.registry.register(info, run_id=self.run_id, owner=self.owner)
        with self._lock:
            self._held[info.sandbox_id] = info

    def destroyed(self, info: SandboxInfo) -> None:
        with self._lock:
            self._held.pop(info.sandbox_id, None)
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

    def destroy_all(self) -> None:
        """Destroy and release every sandbox still held (cancellation, or a run that ended badly)."""
        for info in self.held():
            try:
                destroy_sandbox(info)
            except Exception:
                logger.exception("could not destroy sandbox %s", info.sandbox_id)
            self.destroyed(info)
