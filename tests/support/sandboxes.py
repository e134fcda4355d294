"""Which sandbox backends the interpreter tests run against, and how to check nothing was left behind."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil
import pytest

from broker_bridge import interpreter_factory
from broker_bridge.backends.process_jail import SANDBOX_MARKER_VAR, pids_with_marker


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
