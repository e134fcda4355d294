"""Shared fixtures: a private Redis for the session (flushed per test) and a stub LLM per test.

More fixtures live in modules under tests/support and are imported here or by the tests.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from multiprocessing.context import ForkServerContext
from typing import TYPE_CHECKING

# LiteLLM (and DSPy's model metadata) otherwise fetch a price map from the internet on first
# use, retrying for seconds when offline. Set before anything imports them; children inherit it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# `rlmq up` keeps its state (Redis URL and password) in RLMQ_STATE_DIR, default ~/.cache/rlmq: a stack
# someone else runs on this machine must never be the one a test's client or `rlmq` command finds.
os.environ["RLMQ_STATE_DIR"] = tempfile.mkdtemp(prefix="rlmq-test-state-")
atexit.register(shutil.rmtree, os.environ["RLMQ_STATE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import redis  # noqa: E402

from rlmq.local_redis import PrivateRedis, start_private_redis  # noqa: E402
from tests.support.stub_llm import StubLLM  # noqa: E402

if TYPE_CHECKING:
    from tests.support.sandboxes import SandboxPool

# Fixtures of the Daytona emulator and of the multi-host harness, for every test module: loaded as plugins, not
# imported by name into a test module, where each parameter asking for one would redefine it
pytest_plugins = ["tests.support.daytona_emulator.harness", "tests.support.hosts.fixtures"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[PrivateRedis]:
    server = start_private_redis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: PrivateRedis) -> str:
    """URL of the private Redis, emptied before the test."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def mp_context() -> ForkServerContext:
    """Multiprocessing for tests that need separate OS processes.

    A forkserver does the heavy imports (dspy, redis) once per session; each child is then a
    fork of that single-threaded server, which spawn (seconds of imports per child) is not,
    and a fork of pytest's threads is not safe.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([
        "redis", "workers.single_flight", "tests.support.stub_llm",
        # what `rlmq` imports on its way to an answer (tests.support.cli.rlmq_forked): its client's Celery too
        "tests.support.cli", "rlmq.cli", "rlmq.inputs", "rlmq.celery_config", "celery.app", "dotenv",
    ])
    return ctx


@pytest.fixture
def r(redis_server: PrivateRedis) -> Iterator[redis.Redis]:
    """The private Redis with rlmq's own keys removed, but Celery's and the workers' heartbeats
    left alone: for tests whose module-scoped workers keep their queue bindings in the same Redis."""
    client = redis.Redis.from_url(redis_server.url)
    keys = [k for k in client.scan_iter("rlmq:*", count=1000) if not k.startswith(b"rlmq:worker:")]
    if keys:
        client.delete(*keys)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub() -> Iterator[StubLLM]:
    """One stub LLM for a module whose long-lived workers were started with its address."""
    with StubLLM() as server:
        yield server


@pytest.fixture
def fresh_stub(stub: StubLLM) -> StubLLM:
    """The module's stub as new (``StubLLM.reset``)."""
    stub.reset()
    return stub


@pytest.fixture
def stub_llm() -> Iterator[StubLLM]:
    with StubLLM() as stub:
        yield stub


@pytest.fixture(scope="session")
def sandbox_pool() -> Iterator[SandboxPool]:
    """Started sandboxes shared by the tests of what code does inside one (``SandboxPool``)."""
    from tests.support.sandboxes import SandboxPool  # broker_bridge loads DSPy: only where sandboxes run

    pool = SandboxPool()
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[int]:
    """A host service on loopback (as Flower, a database or a debug port would be)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"hello from the host\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    server.close()
