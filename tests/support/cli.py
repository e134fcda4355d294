"""Driving the real ``rlmq`` command as a subprocess, the way a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

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


def processes_with_cmdline(text: str) -> dict[int, str]:
    """Processes whose command line (arguments joined by spaces) contains ``text``: pid -> command line."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if text in cmdline:
            found[process.pid] = cmdline
    return found


def processes_with_env(entry: str) -> list[int]:
    """Pids other than this test's whose initial environment contains ``entry`` (e.g. ``REDIS_URL=...``)."""
    return sorted(pids_with_env(entry + "\0") - {os.getpid()})
