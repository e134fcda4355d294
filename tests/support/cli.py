"""Driving the real ``rlmq`` command as a subprocess, the way a user does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from broker_bridge.backends.process_jail import pids_with_env

REPO_ROOT = Path(__file__).resolve().parents[2]
RLMQ = [sys.executable, "-m", "rlmq.cli"]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no REDIS_URL unless given, a private state dir, no stray .env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLMQ_", "REDIS_URL"))}
    env.update(RLMQ_STATE_DIR=str(tmp_path / "state"), LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def rlmq(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> Result:
    done = subprocess.run([*RLMQ, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)


def processes_with_env(entry: str) -> list[int]:
    """Pids other than this test's whose initial environment contains ``entry`` (e.g. ``REDIS_URL=...``)."""
    return sorted(pids_with_env(entry + "\0") - {os.getpid()})


def wait_until(predicate, timeout: float, interval: float = 0.2, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout:g}s")
        time.sleep(interval)


def http_status(url: str, auth: str | None = None) -> int:
    """The HTTP status of a GET (basic auth ``user:password`` if given); 0 when nothing answers."""
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0
