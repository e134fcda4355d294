"""An rlmq fleet across hosts, as issue #19 lays it out: host ``a`` runs the Redis primary and a
Sentinel, ``b`` a replica, a Sentinel, an rlm worker and an llm worker, ``c`` a Sentinel, an rlm
worker and an llm worker, ``d`` the client and the stub LLM.

``hosts_fleet(network, ...)`` builds it on a fresh ``Network`` (``fixtures.network``) and returns a
``HostsFleet``: every process is a host's (``Host.spawn``), so ``Network.close()`` stops all of it.
The workers are the ones ``rlmq up`` starts (``rlmq.stack.worker_command``), with rlmq's
``sentinel://`` URL (``HostsFleet.url``) as ``REDIS_URL`` and the short leases of the fault tests
(``FAST_FAULTS_ENV``), the stub on ``d`` as their LLM.

The test itself plays host ``d``: ``with fleet.d.entered():`` makes the sockets the test opens
(the run store's client, ``rlmq.Client``, the Celery control app) sockets on ``d``, so a fault
between ``d`` and another host is one the test's own connections see too.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery

from rlmq.celery_config import point_at
from rlmq.redis_url import connect
from rlmq.stack import READY_MARK, worker_command
from rlmq.store.records import RunRecord
from tests.support.hosts.network import Host, HostProcess, Network
from tests.support.hosts.sentinel import MASTER_NAME, RedisSentinel
from tests.support.reliability import WORKER_ENV, wait_status
from tests.support.stub_llm import StubLLM

__all__ = ["HostsFleet", "hosts_fleet"]

REPO = Path(__file__).resolve().parents[3]
WORKER_HOSTS = ("b", "c")


@dataclass
class HostsFleet:
    network: Network
    redis_group: RedisSentinel  # the primary on a, the replica on b, Sentinels on a, b, c
    stub: StubLLM
    workers: dict[str, HostProcess] = field(default_factory=dict)  # "rlm-b" -> its process

    def host(self, name: str) -> Host:
        return self.network.hosts[name]

    a = property(lambda self: self.host("a"))
    b = property(lambda self: self.host("b"))
    c = property(lambda self: self.host("c"))
    d = property(lambda self: self.host("d"))

    def url(self, db: int = 0) -> str:
        """rlmq's ``sentinel://`` form (``rlmq.redis_url``): Celery's, plus the master's name and the
        Sentinels' password."""
        return (f"{self.redis_group.celery_url(db)}?master_name={MASTER_NAME}"
                f"&sentinel_password={self.redis_group.sentinel_password}")

    def client(self) -> redis.Redis:
        """A client of the primary that follows failovers (open it inside ``d.entered()``)."""
        return connect(self.url(), socket_timeout=5, socket_connect_timeout=2)

    def node(self, name: str) -> str:
        """A worker's Celery node name, as run records name it (``rlm-b@<hostname>``)."""
        return f"{name}@{socket.gethostname()}"

    def start_worker(self, host: str, queue: str, concurrency: int, env: dict[str, str] | None = None) -> HostProcess:
        name = f"{queue}-{host}"
        self.workers[name] = self.host(host).spawn(
            worker_command(queue, name=name, concurrency=concurrency, pool="threads"), name=name, cwd=str(REPO),
            env={**WORKER_ENV, "OPENAI_API_KEY": "stub-key", "RLMQ_LM_API_BASE": self.stub.api_base,
                 "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1", **(env or {}),
                 "REDIS_URL": self.url(), "PYTHONPATH": os.pathsep.join(filter(None, [
                     str(REPO), os.environ.get("PYTHONPATH", "")]))})
        return self.workers[name]

    def wait_ready(self, timeout: float = 120.0) -> None:
        pending = dict(self.workers)
        deadline = time.monotonic() + timeout
        while pending:
            for name, proc in list(pending.items()):
                if not proc.alive:
                    raise RuntimeError(f"{name} exited ({proc.process.returncode}):\n{proc.log_tail()}")
                if READY_MARK in proc.log_tail(200):
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout:g}s:\n{self.logs(list(pending))}")
            time.sleep(0.1)

    def control(self) -> Celery:
        """A Celery app on this fleet's Redis, for ``control`` commands (open it inside ``d.entered()``)."""
        app = Celery("rlmq-hosts-control", set_as_current=False)
        point_at(app, self.url())
        app.conf.accept_content = ["json"]
        return app

    def keep_logs(self) -> Path:
        """The hosts' logs copied where they outlive the network (which deletes its directory)."""
        kept = Path(tempfile.mkdtemp(prefix="rlmq-hosts-logs-"))
        for host in self.network.hosts.values():
            shutil.copytree(host.dir, kept / host.name, ignore=shutil.ignore_patterns("*.aof*", "*.rdb", "*.conf"),
                            dirs_exist_ok=True)
        return kept

    def wait_finished(self, r: redis.Redis, run_id: str, timeout: float) -> RunRecord:
        """The run's record once it has finished; else fail with the workers' log tails and where their
        whole logs were kept."""
        try:
            return wait_status(r, run_id, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}\nfull logs: {self.keep_logs()}") from None

    def logs(self, names: list[str] | None = None, lines: int = 40) -> str:
        """The workers' log tails, for a failing assertion's message."""
        return "\n".join(f"--- {name}\n{self.workers[name].log_tail(lines)}" for name in names or self.workers)


@contextmanager
def hosts_fleet(network: Network, *, rlm_threads: int = 2, llm_threads: int = 8, workers: bool = True,
                env: dict[str, str] | None = None) -> Iterator[HostsFleet]:
    """The layout above on ``network`` (empty), ready: Redis in sync, Sentinels agreeing, workers
    consuming. ``workers=False``: Redis, Sentinels and the stub only. The stub (the test process's)
    stops on exit; the rest is the network's to stop."""
    a, b, c, d = network.add_hosts("a", "b", "c", "d")
    group = RedisSentinel(primary=a, replicas=[b], sentinels=[a, b, c])
    with d.entered():
        stub = StubLLM(host=d.ip).start()
    try:
        group.start()
        fleet = HostsFleet(network, group, stub)
        if workers:
            for host in WORKER_HOSTS:
                fleet.start_worker(host, "rlm", rlm_threads, env)
                fleet.start_worker(host, "llm", llm_threads, env)
            fleet.wait_ready()
        yield fleet
    finally:
        stub.stop()
