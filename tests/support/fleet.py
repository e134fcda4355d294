"""Real Celery workers as separate OS processes, started the way `rlmq up` starts them.

``Fleet(redis_url, env)`` is ``rlmq.stack.LocalStack`` without Redis of its own: each
``start`` runs ``celery -A tasks worker -Q <queue>`` in its own session, ``wait_ready`` waits for
the worker's "ready." line (failing with its log if it exits first), ``start_flower`` adds Flower,
and ``stop`` sends a warm shutdown, then kills each worker's whole process group: nothing is left running.

A test module that wants long-lived workers declares them once::

    fleet = fleet_fixture(env={...}, workers=[("rlm", "rlm1", 2), ("llm", "llmA", 16)])

a module-scoped ``fleet`` fixture on the session's Redis and the module's stub LLM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest
from celery import Celery

from rlmq.celery_config import point_at
from rlmq.stack import ChildProcess, LocalStack, flower_command
from tests.support.net import free_port, http_get
from tests.support.stub_llm import StubLLM
from tests.support.wait import wait_until

__all__ = [
    "REPO_ROOT",
    "Fleet",
    "WorkerProcess",
    "WorkerSpec",
    "configure_app",
    "fleet_fixture",
    "redis_url_of",
    "started_fleet",
]

REPO_ROOT = Path(__file__).resolve().parents[2]


def configure_app(redis_url: str) -> None:
    """Point the workers' Celery app (what ``AsyncResult`` and task ``.delay`` use in tests) at ``redis_url``."""
    from rlmq.celery_config import point_at
    from tasks.app import app

    point_at(app, redis_url)


def redis_url_of(client) -> str:
    """The URL a redis-py client was made from (tests hand it to ``rlmq.Client``)."""
    kw = client.connection_pool.connection_kwargs
    auth = f":{kw['password']}@" if kw.get("password") else ""
    return f"redis://{auth}{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


@dataclass
class WorkerProcess:
    name: str  # node name as Celery reports it (name@host)
    queue: str
    child: ChildProcess

    @property
    def proc(self) -> subprocess.Popen:
        return self.child.process

    @property
    def alive(self) -> bool:
        return self.child.alive

    def log_tail(self, lines: int = 40) -> str:
        return self.child.log_tail(lines)


class Fleet:
    """A set of worker processes sharing one Redis and one environment."""

    def __init__(self, redis_url: str, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.redis_url = redis_url
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        self.stack = LocalStack(redis_url=redis_url, flower_port=None, env={
            "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {}), "PYTHONPATH": pythonpath,
        }, cwd=cwd)
        self.workers: list[WorkerProcess] = []
        self.client = Celery("rlmq-test-client")
        point_at(self.client, redis_url)  # a sentinel:// URL too
        self.client.conf.accept_content = ["json"]

    def start(self, queue: str, *, name: str, concurrency: int = 4, pool: str | None = None,
              extra_env: dict[str, str] | None = None, wait: bool = True) -> WorkerProcess:
        pool = pool or "threads"  # what `rlmq up`, `rlmq worker` and compose run
        child = self.stack.start_worker(queue, name=name, concurrency=concurrency, pool=pool, env=extra_env)
        worker = WorkerProcess(f"{name}@{socket.gethostname()}", queue, child)
        self.workers.append(worker)
        if wait:
            self.wait_ready([worker])
        return worker

    def wait_ready(self, workers: list[WorkerProcess] | None = None, timeout: float = 60.0) -> None:
        self.stack.wait_ready([w.child for w in (workers or self.workers)], timeout)

    def kill(self, worker: WorkerProcess, sig: int = signal.SIGKILL) -> None:
        """Kill a worker's whole process group (a crash, as far as Celery can tell)."""
        try:
            os.killpg(worker.proc.pid, sig)
        except ProcessLookupError:
            pass
        worker.proc.wait(10)

    def start_flower(self, timeout: float = 60.0) -> str:
        """Flower as users run it (its REST API open, as ``FLOWER_UNAUTHENTICATED_API=true`` makes it) on
        a free loopback port, once its API answers: its base URL."""
        port = free_port()
        self.stack.spawn("flower", flower_command(port=port, address="127.0.0.1"),
                         env={"FLOWER_UNAUTHENTICATED_API": "true"})
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_get(url + "/api/workers")[0] == 200, timeout, "Flower answering")
        return url

    def stop(self, grace: float = 10.0) -> None:
        self.stack.stop(grace)
        self.workers.clear()
        self.client.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def thread_stacks(children: list[ChildProcess], settle: float = 1.0) -> str:
    """Every live worker's thread stacks, for a test that found a run stuck: Celery's own SIGUSR1
    handler prints them to the worker's log (``celery.utils.debug.cry``); return those logs' tails."""
    live = [c for c in children if c.alive]
    for child in live:
        try:
            os.kill(child.process.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    time.sleep(settle)
    return "\n".join(f"--- {c.name} (thread stacks)\n{c.log_tail(300)}" for c in live)


WorkerSpec = tuple[str, str, int] | tuple[str, str, int, str]  # (queue, node name, concurrency[, pool])


@contextmanager
def started_fleet(redis_url: str, env: dict[str, str], workers: Sequence[WorkerSpec],
                  timeout: float = 120.0) -> Iterator[Fleet]:
    """``workers`` started together (their imports overlap) and ready, with the tests' Celery app pointed
    at the same Redis; all of them stopped on exit."""
    configure_app(redis_url)
    with Fleet(redis_url, env) as fleet:
        started = [fleet.start(spec[0], name=spec[1], concurrency=spec[2], pool=spec[3] if len(spec) > 3 else None,
                               wait=False) for spec in workers]
        fleet.wait_ready(started, timeout=timeout)
        yield fleet


def fleet_fixture(*, env: dict[str, str], workers: Sequence[WorkerSpec], timeout: float = 120.0):
    """A module-scoped ``fleet`` fixture: ``workers`` on the session's Redis with ``env``, their LLM
    endpoint (``RLMQ_LM_API_BASE``) the module's stub."""

    @pytest.fixture(scope="module", name="fleet")
    def fixture(redis_server, stub: StubLLM) -> Iterator[Fleet]:
        with started_fleet(redis_server.url, {**env, "RLMQ_LM_API_BASE": stub.api_base}, workers, timeout) as fleet:
            yield fleet

    return fixture
