"""The whole rlmq stack on one machine, as child processes: Redis, an ``rlm`` worker, an ``llm``
worker and Flower (what ``rlmq up`` runs, and what tests use to run workers the way users do).

Every child gets its own session, so stopping kills each one's whole process group (prefork
children included) and nothing is left running. The stack writes a small state file so that
``rlmq submit`` in another terminal finds its Redis without any configuration. That file holds
secrets — the private Redis's password (in its URL) and Flower's generated login — so it is
written mode 0600 in a 0700 directory, and replaced atomically.

The private Redis keeps its data in an append-only file in the state directory
(``$RLMQ_STATE_DIR/redis``, else ``~/.cache/rlmq/redis``): ``revive_redis`` restarts a Redis that
died on the same port and data, and a new ``rlmq up`` reloads every run, result and cache entry.
The workers' own maintenance (reaping, run recovery) runs in every rlm worker: no beat needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlmq.celery_config import CELERY_APP, RLM_QUEUE
from rlmq.local_redis import PrivateRedis, start_private_redis

__all__ = ["ChildProcess", "LocalStack", "StackError", "exporter_command", "flower_command", "generate_flower_auth",
           "redacted_url", "running_stack", "running_stack_url", "state_file", "worker_command"]

READY_MARK = " ready."  # Celery logs "<node> ready." once a worker consumes


def state_file() -> Path:
    base = os.environ.get("RLMQ_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rlmq")
    return Path(base) / "stack.json"


def redis_data_dir() -> Path:
    return state_file().parent / "redis"


def running_stack() -> dict[str, Any] | None:
    """The state of a stack started by ``rlmq up`` that is still running, if any."""
    try:
        state = json.loads(state_file().read_text())
        os.kill(int(state["pid"]), 0)
        str(state["redis_url"])
        return state if isinstance(state, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_stack_url() -> str | None:
    """The Redis URL (with its password) of a stack started by ``rlmq up`` that is still running, if any."""
    state = running_stack()
    return None if state is None else str(state["redis_url"])


def generate_flower_auth() -> str:
    """A fresh Flower login, ``rlmq:<random>`` (basic auth)."""
    return f"rlmq:{secrets.token_urlsafe(18)}"


def redacted_url(url: str) -> str:
    """``url`` with its passwords replaced by ``****``, for printing: each part's ``user:password@``, and
    the ``password`` / ``sentinel_password`` query arguments (a ``sentinel://`` URL names both)."""
    url = _USERINFO_PASSWORD.sub(r"\1****@", url)
    return _QUERY_PASSWORD.sub(r"\1****", url)


_USERINFO_PASSWORD = re.compile(r"(://[^:@/;?]*:)[^@;]*@")
_QUERY_PASSWORD = re.compile(r"([?&](?:sentinel_)?password=)[^&]*")


# Both queues run in a threads pool: a run mostly waits (on its root LM, its sandbox, its sub-calls), and a
# thread holds one in a few MiB where a prefork slot costs ~270 MiB (docs/ARCHITECTURE.md, "Many runs at
# once"); the engine enforces a run's time limit itself, which Celery does only in process pools.
RLM_THREADS = 32
LLM_THREADS = 32


def worker_command(queue: str, *, name: str, concurrency: int, pool: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", CELERY_APP, "worker", "-Q", queue, "-P", pool, "-c", str(concurrency),
        "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "-l", "INFO",
        *(["--prefetch-multiplier", "1", "-E"] if queue == RLM_QUEUE else []),
    ]


# Flower's task list shows these columns: args (the run's signature), kwargs (its inputs' sizes)
# and result (a working run's live progress) say what each run is (rlmq.flower_repr).
FLOWER_TASK_COLUMNS = "name,state,result,args,kwargs,received,runtime,worker,uuid"


def exporter_command(*, port: int, address: str) -> list[str]:
    return [sys.executable, "-m", "rlmq.cli", "exporter", f"--port={port}", f"--address={address}"]


def flower_command(*, port: int, address: str) -> list[str]:
    """Flower's command line; its login goes in ``FLOWER_BASIC_AUTH`` (Flower reads it from the
    environment), never on a command line, which every user of the machine can read."""
    return [sys.executable, "-m", "celery", "-A", CELERY_APP, "flower", f"--port={port}", f"--address={address}",
            f"--tasks_columns={FLOWER_TASK_COLUMNS}"]


@dataclass
class ChildProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def last_error_line(self) -> str:
        """The one line that explains why it stopped (rlmq's own message, if it printed one)."""
        lines = self.log_tail(60).splitlines()
        for line in reversed(lines):
            if line.startswith("rlmq"):
                return line
        return lines[-1] if lines else f"exit code {self.process.returncode}"

    def stop(self, grace: float) -> None:
        """SIGTERM to the main process (Celery's warm shutdown: an rlm worker hands its runs back), then
        SIGKILL the whole group. Not SIGTERM to the group: Celery's prefork children die of it at once."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            self.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


class StackError(RuntimeError):
    """The local stack could not be started; the message is one line."""


@dataclass
class LocalStack:
    """Redis (``redis_url`` or a private one), workers and Flower as children of this process."""

    redis_url: str | None = None
    rlm_concurrency: int = RLM_THREADS
    llm_concurrency: int = LLM_THREADS
    flower_port: int | None = 5555  # None: no Flower
    flower_auth: str | None = None  # user:password; None: generated at start
    exporter_port: int | None = None  # Prometheus metrics (`rlmq exporter`; `rlmq up` serves 9808); None: none
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None  # the children's working directory (where a worker finds .env); default ours
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rlmq-stack-")))
    children: list[ChildProcess] = field(default_factory=list)
    private_redis: PrivateRedis | None = None

    def start(self, *, timeout: float = 90.0) -> LocalStack:
        try:
            if self.redis_url is None:
                data = redis_data_dir()
                data.mkdir(parents=True, exist_ok=True)
                self.private_redis = start_private_redis(dir=str(data), appendonly=True)
                self.redis_url = self.private_redis.url
            self.start_worker("rlm", name=f"rlm-{os.getpid()}", concurrency=self.rlm_concurrency, pool="threads")
            self.start_worker("llm", name=f"llm-{os.getpid()}", concurrency=self.llm_concurrency, pool="threads")
            if self.flower_port is not None:
                self.flower_auth = self.flower_auth or generate_flower_auth()
                self.spawn("flower", flower_command(port=self.flower_port, address="127.0.0.1"),
                           {"FLOWER_BASIC_AUTH": self.flower_auth})
            if self.exporter_port is not None:
                self.spawn("exporter", exporter_command(port=self.exporter_port, address="127.0.0.1"))
            self.wait_ready([c for c in self.children if c.name not in ("flower", "exporter")], timeout)
            self._write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def start_or_explain(self) -> LocalStack:
        """``start``, with any failure as one :class:`StackError` line (rlmq's own reason if a child gave one)."""
        try:
            return self.start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            lines = str(exc).splitlines() or [type(exc).__name__]
            reason = next((line for line in reversed(lines) if line.startswith("rlmq")), lines[0])
            raise StackError(f"could not start the stack: {reason}") from None

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> ChildProcess:
        assert self.redis_url is not None
        env = {**os.environ, **self.env, **(env or {}), "REDIS_URL": self.redis_url}
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        child = ChildProcess(name, process, log_path)
        self.children.append(child)
        return child

    def start_worker(self, queue: str, *, name: str, concurrency: int, pool: str,
                     env: dict[str, str] | None = None) -> ChildProcess:
        return self.spawn(name, worker_command(queue, name=name, concurrency=concurrency, pool=pool), env)

    def wait_ready(self, children: list[ChildProcess], timeout: float = 90.0) -> None:
        """Until each worker logged that it is ready; a worker that exits first fails with its log."""
        pending = list(children)
        deadline = time.monotonic() + timeout
        while pending:
            for child in list(pending):
                if not child.alive:
                    raise RuntimeError(f"{child.name} exited with code {child.process.returncode}:\n{child.log_tail()}")
                with contextlib.suppress(OSError):
                    if READY_MARK in child.log_path.read_text(errors="replace"):
                        pending.remove(child)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {c.name}\n{c.log_tail()}" for c in pending)
                raise TimeoutError(f"not ready after {timeout:g}s:\n{tails}")
            time.sleep(0.1)

    def revive_redis(self) -> bool:
        """Restart the private Redis if it has died, on the same port and data; True if it did."""
        server = self.private_redis
        if server is None or server.process.poll() is None:
            return False
        self.private_redis = start_private_redis(server.port, dir=server.dir, binary=server.binary, appendonly=True,
                                                 password=server.password)  # clients keep their URLs
        return True

    def dead_children(self) -> list[ChildProcess]:
        return [c for c in self.children if not c.alive]

    def stop(self, grace: float = 10.0) -> None:
        # Runs first (their warm shutdown may still need the llm workers), then the rest.
        for child in self.children:
            child.stop(grace if child.name.startswith("rlm") else 5.0)
        self.children.clear()
        if self.private_redis is not None:
            self.private_redis.stop()
            self.private_redis = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            path = state_file()
            if json.loads(path.read_text())["pid"] == os.getpid():
                path.unlink()

    def _write_state(self) -> None:
        state: dict[str, Any] = {"pid": os.getpid(), "redis_url": self.redis_url, "logs": str(self.log_dir)}
        if self.flower_port is not None:
            state["flower"] = {"url": f"http://127.0.0.1:{self.flower_port}", "basic_auth": self.flower_auth}
        if self.exporter_port is not None:
            state["metrics"] = f"http://127.0.0.1:{self.exporter_port}/metrics"
        write_private(state_file(), json.dumps(state))

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` as a 0600 file in a 0700 directory, replacing it atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.parent.stat()
    if info.st_uid == os.getuid() and not info.st_mode & stat.S_ISVTX:  # ours, not a shared /tmp-like dir
        os.chmod(path.parent, 0o700)  # also when an older rlmq made it with wider permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that existed
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
