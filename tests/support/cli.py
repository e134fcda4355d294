"""Driving the real ``rlmq`` command the way a user does: as a subprocess (``rlmq``), or, where a test
runs it many times, in a process forked from the session's forkserver (``rlmq_forked``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext
from pathlib import Path

import psutil

from tests.support.children import exit_code

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


def rlmq_forked(context: ForkServerContext, *args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> Result:
    """``rlmq`` as ``rlmq()`` runs it, in a process forked from the session's forkserver (``mp_context``).

    The same boundary (its own environment, working directory, exit code, stdout and stderr; ``sys.exit``
    of what ``main`` returns, as ``python -m rlmq.cli`` does), without an interpreter start and rlmq's
    imports per call: about a second each on a busy 2-core machine, which the many bad-argument checks
    would otherwise pay one by one.
    """
    with tempfile.TemporaryDirectory(prefix="rlmq-cli-") as out_dir:
        stdout, stderr = Path(out_dir, "stdout"), Path(out_dir, "stderr")
        child = context.Process(target=_run_cli, args=(list(args), env, str(cwd), str(stdout), str(stderr)))
        child.start()
        code = exit_code(child, timeout)
        if code is None:
            raise AssertionError(f"rlmq {' '.join(args)} still running after {timeout:g}s")
        return Result(code, stdout.read_text(), stderr.read_text())


def _run_cli(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(handle, fd)
        os.close(handle)
    from rlmq.cli import main

    sys.exit(main(argv))  # multiprocessing turns SystemExit into the exit code, as the interpreter does


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
    from broker_bridge.backends.process_jail import pids_with_env  # here: broker_bridge loads DSPy (rlmq_forked)

    return sorted(pids_with_env(entry + "\0") - {os.getpid()})
