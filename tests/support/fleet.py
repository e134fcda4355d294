"""Real Celery workers as separate OS processes, the way users run them.

``Fleet(redis_url, env)`` starts ``celery -A tasks worker -Q <queue>`` subprocesses (each in its
own session, so a prefork worker's children share its process group), waits until each
answers ``app.control.ping``, and at ``stop()`` sends a warm shutdown, then kills the whole
process group of any worker still alive: nothing is left running. Worker logs go to files
whose tails are shown when a worker fails to start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from celery import Celery

__all__ = ["Fleet", "WorkerProcess", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class WorkerProcess:
    name: str  # node name as Celery reports it (name@host)
    queue: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Fleet:
    """A set of worker processes sharing one Redis and one environment."""

    redis_url: str
    env: dict[str, str] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rlmq-fleet-")))

    def __post_init__(self) -> None:
        self.client = Celery("rlmq-test-client", broker=self.redis_url, backend=self.redis_url)
        self.client.conf.accept_content = ["json"]

    def start(self, queue: str, *, name: str, concurrency: int = 4, pool: str | None = None,
              extra_env: dict[str, str] | None = None, wait: bool = True) -> WorkerProcess:
        pool = pool or ("threads" if queue == "llm" else "prefork")
        env = {**os.environ, **self.env, **(extra_env or {}), "REDIS_URL": self.redis_url}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        log_path = self.log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", queue, "-P", pool,
               "-c", str(concurrency), "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
               "-l", "INFO"]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        worker = WorkerProcess(f"{name}@{socket.gethostname()}", queue, proc, log_path)
        self.workers.append(worker)
        if wait:
            self.wait_ready([worker])
        return worker

    def wait_ready(self, workers: list[WorkerProcess] | None = None, timeout: float = 60.0) -> None:
        """Block until every worker answers a ping; fail with its log if it exits or times out."""
        pending = {w.name: w for w in (workers or self.workers)}
        deadline = time.monotonic() + timeout
        while pending:
            for w in pending.values():
                if not w.alive:
                    raise RuntimeError(f"worker {w.name} exited with {w.proc.returncode}:\n{w.log_tail()}")
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in pending.values())
                raise TimeoutError(f"workers not ready after {timeout}s:\n{tails}")
            replies = self.client.control.ping(destination=list(pending), timeout=0.5) or []
            for reply in replies:
                for node in reply:
                    pending.pop(node, None)

    def kill(self, worker: WorkerProcess, sig: int = signal.SIGKILL) -> None:
        """Kill a worker's whole process group (a crash, as far as Celery can tell)."""
        try:
            os.killpg(worker.proc.pid, sig)
        except ProcessLookupError:
            pass
        worker.proc.wait(10)

    def stop(self, grace: float = 10.0) -> None:
        """Warm shutdown for all, then SIGKILL the process group of any straggler."""
        for w in self.workers:
            if w.alive:
                try:
                    os.killpg(w.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for w in self.workers:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # also reaps prefork children left in the group
                os.killpg(w.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if w.proc.poll() is None:
                w.proc.wait(10)
        self.workers.clear()
        self.client.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
