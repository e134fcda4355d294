"""Which sandbox backends the interpreter tests run against, and how to check nothing was left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from broker_bridge import interpreter_factory
from broker_bridge.backends.process_jail import pids_with_marker


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
