"""Which sandbox backends the interpreter tests run against, a pool of started sandboxes they share, and
how to check nothing was left behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from dspy.primitives.code_interpreter import CodeInterpreterError

from broker_bridge import SandboxInterpreter, interpreter_factory
from broker_bridge.backends import bwrap
from broker_bridge.backends.process_jail import SANDBOX_MARKER_VAR, pids_with_marker

# Tests of bubblewrap sandboxes (local namespaces mode, the Daytona emulator's sandboxes): skipped,
# saying why, where this machine cannot make user namespaces.
needs_namespaces = pytest.mark.skipif(bwrap.probe()[0] is None, reason=f"no namespaces here: {bwrap.probe()[1]}")


def available_backends() -> list:
    """Local always; Daytona against the emulator (the ``backend`` fixture starts it; several processes,
    so slow); Daytona's cloud as "daytona-live" where a key is set."""
    return [
        "local",
        pytest.param("daytona", marks=pytest.mark.slow),
        pytest.param(
            "daytona-live",
            marks=[
                pytest.mark.live,
                pytest.mark.skipif(not os.environ.get("DAYTONA_API_KEY"), reason="DAYTONA_API_KEY is not set"),
            ],
        ),
    ]


def make_factory(backend: str, **options):
    if backend == "daytona-live":
        backend = "daytona"
        options.setdefault("execution_timeout", 120)
    return interpreter_factory(backend, **options)


# Run once in a new pooled sandbox: remember its globals (the bridge's runtime among them) and define how
# to return to them. The same reset DSPy's own tests give their pooled interpreter.
_POOL_SETUP = """
def _rlmq_pool_reset():
    names = globals()
    for name in [n for n in names if n not in _RLMQ_POOL_SAVED]:
        del names[name]
    names.update(_RLMQ_POOL_SAVED)

_RLMQ_POOL_SAVED = dict(globals())
_RLMQ_POOL_SAVED["_RLMQ_POOL_SAVED"] = _RLMQ_POOL_SAVED
"""


class SandboxPool:
    """Started interpreters, one per backend, lent to one test at a time and reset after it.

    A sandbox costs a start (a bwrap and a Python on the local backend, a cloud sandbox on Daytona); tests
    of what code does inside one need not pay it each. After each test the host side drops its tools and
    output fields, and the sandbox's globals return to what they were after the start. A test that ends
    its session (shutdown, a timeout) must take an interpreter of its own: returning a dead one fails
    the test that killed it, loudly, and the next test gets a new sandbox.
    """

    def __init__(self) -> None:
        self._idle: dict[str, SandboxInterpreter] = {}

    @contextmanager
    def lend(self, backend: str) -> Iterator[SandboxInterpreter]:
        if backend != "local":
            # A Daytona sandbox lives in the emulator, whose per-test cleanup deletes every sandbox (that
            # is how tests prove nothing leaked): it cannot outlive the test, so it is not pooled.
            interpreter = make_factory(backend)()
            try:
                yield interpreter
            finally:
                interpreter.shutdown()
            return
        interpreter = self._idle.pop(backend, None)
        if interpreter is None:
            interpreter = make_factory(backend)()
            interpreter.execute(_POOL_SETUP)
        yield interpreter
        interpreter.tools.clear()
        interpreter.output_fields = None
        try:
            interpreter.execute("_rlmq_pool_reset()")
        except CodeInterpreterError:
            interpreter.shutdown()
            raise
        self._idle[backend] = interpreter

    def close(self) -> None:
        for interpreter in self._idle.values():
            interpreter.shutdown()
        self._idle.clear()


def started_local(**options) -> tuple:
    """A started local interpreter with what ``assert_local_sandbox_gone`` checks once it is gone:
    (interpreter, its sandbox id, its host directory)."""
    interpreter = interpreter_factory("local", **options)()
    interpreter.start()
    return interpreter, interpreter.sandbox_id, host_dir(interpreter)


def host_dir(interpreter) -> str:
    """A started local interpreter's sandbox directory as the host sees it (inside it is /sandbox)."""
    return interpreter._backend.host_dir


def assert_local_sandbox_gone(sandbox_id: str, runtime_dir: str | None = None, within: float = 5.0) -> None:
    """No process of the sandbox runs and its directory is gone (polls briefly: SIGKILL is asynchronous)."""
    deadline = time.monotonic() + within
    while pids_with_marker(sandbox_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pids_with_marker(sandbox_id), f"processes of {sandbox_id} are still running"
    if runtime_dir is not None:
        assert not Path(runtime_dir).exists(), f"{runtime_dir} was not removed"


class SandboxesOf:
    """The local sandboxes started under one process tree (``rlmq up``, ``rlmq demo``), sampled in the
    background while it runs, so a check counts this test's sandboxes, never other sandboxes on the machine.

    A sandbox is recognised by its processes' marker (``RLMQ_SANDBOX_ID``) among the tree's descendants;
    one that outlives the tree was a descendant while the tree lived, so sampling catches it.
    """

    def __init__(self, root_pid: int, interval: float = 0.1) -> None:
        self.root_pid = root_pid
        self.interval = interval
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> SandboxesOf:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self) -> set[str]:
        """Sandbox ids with a process under the tree now (also recorded in ``seen``)."""
        try:
            descendants = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return set()
        now = set()
        for process in descendants:
            try:
                sandbox_id = process.environ().get(SANDBOX_MARKER_VAR)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if sandbox_id:
                now.add(sandbox_id)
        self.seen |= now
        return now

    def live(self) -> set[str]:
        """Sandboxes of this tree (seen so far) with a process still running anywhere."""
        self.sample()
        return {sandbox_id for sandbox_id in self.seen if pids_with_marker(sandbox_id)}

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
