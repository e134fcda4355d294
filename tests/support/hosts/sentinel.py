"""Redis with Sentinel across hosts: a primary, its replicas and three Sentinels (quorum 2), as a
deployment that survives losing its Redis host would run them.

``RedisSentinel(primary=a, replicas=[b], sentinels=[a, b, c]).start()`` starts ``redis-server``
on the primary and each replica (``requirepass`` and ``masterauth``, append-only file fsynced
every second) and ``redis-server --sentinel`` on each Sentinel host (its own ``requirepass``,
``sentinel auth-pass`` for the Redis password, ``sentinel sentinel-pass`` between Sentinels), and
waits until the replicas are in sync and every Sentinel sees the primary, the replicas and the
other Sentinels. Failure is noticed after ``down_after_ms`` (1 s here, 30 s by default in Redis),
so tests fail over in seconds.

Passwords reach the servers in 0600 config files, never on a command line. Every port is the
standard one (6379, 26379): each host is a namespace of its own, so nothing else can hold them.

How clients find the primary: ``celery_url()`` is Celery's ``sentinel://`` broker/backend URL
and ``transport_options()`` what Celery needs beside it (``master_name``, and the Sentinels'
password in ``sentinel_kwargs``); ``client()`` is a redis-py ``Sentinel`` for tests, to be used
inside ``host.entered()`` (sockets must be opened on a host).
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from rlmq.local_redis import find_redis_server
from tests.support.hosts.network import Host, HostProcess

__all__ = ["MASTER_NAME", "REDIS_PORT", "SENTINEL_PORT", "RedisSentinel", "sentinel_config"]

MASTER_NAME = "rlmq"
REDIS_PORT = 6379
SENTINEL_PORT = 26379


def _write_private(path: Path, lines: list[str]) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def sentinel_config(path: Path, *, bind: str, port: int, data: Path, primary: tuple[str, int], quorum: int,
                    password: str, sentinel_password: str, down_after_ms: int, failover_timeout_ms: int) -> Path:
    """A Sentinel's config file monitoring ``primary`` as ``MASTER_NAME``: private (it holds both passwords)
    and writable (Sentinel rewrites it as it learns the topology)."""
    return _write_private(path, [
        f"bind {bind}", f"port {port}", "daemonize no", 'logfile ""', f"dir {data}",
        f"requirepass {sentinel_password}", f"sentinel sentinel-pass {sentinel_password}",
        f"sentinel monitor {MASTER_NAME} {primary[0]} {primary[1]} {quorum}",
        f"sentinel auth-pass {MASTER_NAME} {password}",
        f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}",
        f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}",
        f"sentinel parallel-syncs {MASTER_NAME} 1",
    ])


@dataclass
class RedisSentinel:
    primary: Host
    replicas: list[Host]
    sentinels: list[Host]
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    binary: str = field(default_factory=find_redis_server)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    sentinel_password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    servers: dict[str, HostProcess] = field(default_factory=dict)  # host name -> its redis-server
    sentinel_processes: dict[str, HostProcess] = field(default_factory=dict)  # host name -> its Sentinel

    # -- what clients are given -------------------------------------------------------------------

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(host.ip, SENTINEL_PORT) for host in self.sentinels]

    def celery_url(self, db: int = 0) -> str:
        """Celery's form, ``sentinel://:password@h1:26379/db;...;sentinel://:password@hN:26379/db``, as
        ``rlmq.redis_url`` gives it: kombu takes the password and database from the part it is on,
        which changes at a failover. The password is the Redis servers' (kombu gives it to the
        primary's connections); the Sentinels' own goes in ``transport_options()['sentinel_kwargs']``."""
        return ";".join(f"sentinel://:{self.password}@{ip}:{port}/{db}" for ip, port in self.sentinel_addresses())

    def transport_options(self) -> dict[str, object]:
        """For ``broker_transport_options`` and ``result_backend_transport_options``."""
        return {"master_name": MASTER_NAME, "sentinel_kwargs": self.sentinel_kwargs()}

    def client(self, **connection_kwargs: object) -> Sentinel:
        """A redis-py Sentinel that asks the Sentinels for the primary (use within ``host.entered()``)."""
        kwargs: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0, **connection_kwargs}
        return Sentinel(self.sentinel_addresses(), password=self.password,
                        sentinel_kwargs=self.sentinel_kwargs(), **kwargs)

    def sentinel_kwargs(self) -> dict[str, object]:
        """How to talk to the Sentinels: their password, and no retries of a Sentinel that does not
        answer, since the next one is asked anyway (redis-py's default, ten retries with backoff
        per Sentinel, nested inside the master connection's own, stalls a client for over a
        minute when a Sentinel's host is gone)."""
        return {"password": self.sentinel_password, "socket_timeout": 1.0, "socket_connect_timeout": 1.0,
                "retry": Retry(NoBackoff(), 0)}

    # -- running it -------------------------------------------------------------------------------

    def _server_config(self, host: Host, replica_of: Host | None) -> Path:
        data = host.dir / "redis"
        data.mkdir(exist_ok=True)
        return _write_private(host.dir / "redis.conf", [
            f"bind {host.ip}", f"port {REDIS_PORT}", "daemonize no", 'logfile ""', f"dir {data}",
            'save ""', "appendonly yes", "appendfsync everysec",
            f"requirepass {self.password}", f"masterauth {self.password}",
            *([f"replicaof {replica_of.ip} {REDIS_PORT}"] if replica_of else []),
        ])

    def _sentinel_config(self, host: Host) -> Path:
        data = host.dir / "sentinel"
        data.mkdir(exist_ok=True)
        return sentinel_config(data / "sentinel.conf", bind=host.ip, port=SENTINEL_PORT, data=data,
                               primary=(self.primary.ip, REDIS_PORT), quorum=self.quorum, password=self.password,
                               sentinel_password=self.sentinel_password, down_after_ms=self.down_after_ms,
                               failover_timeout_ms=self.failover_timeout_ms)

    def start(self, timeout: float = 30.0) -> RedisSentinel:
        self.servers[self.primary.name] = self.primary.spawn(
            [self.binary, str(self._server_config(self.primary, None))], name="redis")
        for host in self.replicas:
            self.servers[host.name] = host.spawn([self.binary, str(self._server_config(host, self.primary))],
                                                 name="redis")
        for host in self.sentinels:
            self.sentinel_processes[host.name] = host.spawn(
                [self.binary, str(self._sentinel_config(host)), "--sentinel"], name="sentinel")
        self.wait_ready(timeout)
        return self

    def _died(self) -> str | None:
        for proc in [*self.servers.values(), *self.sentinel_processes.values()]:
            if not proc.alive:
                return f"{proc.name} exited ({proc.process.returncode}):\n{proc.log_tail()}"
        return None

    def sentinel_view(self, via: Host, sentinel: Host) -> dict[str, Any]:
        """``SENTINEL MASTER`` as one Sentinel answers it, asked from host ``via``."""
        with via.entered():
            conn = redis.Redis(host=sentinel.ip, port=SENTINEL_PORT, password=self.sentinel_password,
                               socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True)
            try:
                view = conn.sentinel_master(MASTER_NAME)
            finally:
                conn.close()
        assert isinstance(view, dict), view  # from a plain client; the bool in its type is its Sentinel client's answer
        return view

    def online_replicas(self) -> int:
        """How many replicas the primary streams to now (``INFO replication``, state online)."""
        with self.primary.entered():
            conn = redis.Redis(host=self.primary.ip, port=REDIS_PORT, password=self.password, socket_timeout=1.0,
                               socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))
            try:
                info = conn.info("replication")
            finally:
                conn.close()
        return sum(1 for key, value in info.items()
                   if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every replica is in sync with the primary, and each Sentinel knows the primary,
        every replica and every other Sentinel."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            died = self._died()
            if died:
                raise RuntimeError(died)
            try:
                views = [self.sentinel_view(host, host) for host in self.sentinels]
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                last = repr(exc)
            else:
                last = repr([(v.get("ip"), v.get("num-slaves"), v.get("num-other-sentinels")) for v in views])
                if all(v.get("ip") == self.primary.ip and int(v["num-slaves"]) == len(self.replicas)
                       and int(v["num-other-sentinels"]) == len(self.sentinels) - 1 for v in views):
                    online = self.online_replicas()
                    if online == len(self.replicas):
                        return
                    last = f"{online} of {len(self.replicas)} replicas in sync"
            time.sleep(0.2)
        raise RuntimeError(f"the Sentinels did not agree on the topology within {timeout:.0f}s: {last}")

    def master_address(self, via: Host) -> tuple[str, int]:
        """The primary's address as the Sentinels report it now (asked from host ``via``)."""
        with via.entered():
            client = self.client()
            try:
                return client.discover_master(MASTER_NAME)
            finally:
                for conn in client.sentinels:
                    conn.close()

    def wait_failover(self, via: Host, away_from: Host, timeout: float = 30.0) -> tuple[str, int]:
        """Until the Sentinels name a primary other than ``away_from``; returns its address."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                address = self.master_address(via)
            except (redis.ConnectionError, redis.TimeoutError, MasterNotFoundError) as exc:
                last = exc
            else:
                if address[0] != away_from.ip:
                    return address
                last = address
            time.sleep(0.2)
        raise RuntimeError(f"no failover away from {away_from.name} within {timeout:.0f}s (last: {last!r})")
