"""The local backend: a sandbox made of two subprocesses on this machine (for development and tests).

The broker (``broker.py``) and a persistent Python context (``kernel.py``) run in their own
temporary directory, their own session, with a scrubbed environment (no API keys, tokens or
other secrets of the host), resource limits, and a process cap. It is process isolation, not a
security boundary: sandbox code runs as the same machine user and can read what that user can.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from broker_bridge.backends.base import (
    BrokerEndpoint,
    SandboxBackend,
    SandboxDied,
    SandboxError,
    SandboxInfo,
    SandboxSpec,
    SandboxStartError,
    SandboxTimeout,
    broker_command,
    runtime_file_contents,
)
from broker_bridge.backends.process_jail import SANDBOX_MARKER_VAR, ProcessJail, pids_with_marker
from broker_bridge.sandbox.protocol import PORT_ANNOUNCEMENT, protect_host_process

# Variables a sandbox may inherit; everything else (API keys, tokens, cloud credentials) stays out.
ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")
SECRET_NAME_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
SANDBOX_DIR_PREFIX = "rlmq-sandbox-"


def scrubbed_environment(sandbox_id: str, home: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a sandbox process: an allowlist of the host's, never a secret."""
    env = {name: os.environ[name] for name in ENV_ALLOWLIST if name in os.environ}
    for name in extra or {}:
        if any(part in name.upper() for part in SECRET_NAME_PARTS):
            raise ValueError(f"refusing to pass {name!r} into a sandbox: it looks like a secret")
    env.update(extra or {})
    env.update(
        HOME=home,
        TMPDIR=home,
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        **{SANDBOX_MARKER_VAR: sandbox_id},
    )
    return env


class LocalSandbox(SandboxBackend):
    kind = "local"

    def __init__(
        self,
        *,
        python: str = sys.executable,
        memory_limit_mb: int | None = 4096,
        cpu_seconds: int | None = 3600,
        max_open_files: int | None = 1024,
        max_processes: int = 256,
        base_dir: str | None = None,
        boot_timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.python = python
        self.limits = {
            "as_bytes": None if memory_limit_mb is None else memory_limit_mb * 1024 * 1024,
            "cpu_seconds": cpu_seconds,
            "open_files": max_open_files,
        }
        self.max_processes = max_processes
        self.base_dir = base_dir
        self.boot_timeout = boot_timeout
        self.extra_env = dict(env or {})
        self._dir: Path | None = None
        self._spec: SandboxSpec | None = None
        self._jail: ProcessJail | None = None
        self._broker: subprocess.Popen | None = None
        self._kernel: subprocess.Popen | None = None
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._destroy_lock = threading.Lock()
        self._destroyed = False

    @property
    def runtime_dir(self) -> str:
        if self._dir is None:
            raise SandboxError("the local sandbox has not been booted")
        return str(self._dir)

    def info(self) -> SandboxInfo:
        assert self._spec is not None
        return SandboxInfo(backend=self.kind, sandbox_id=self._spec.sandbox_id, labels=dict(self._spec.labels))

    # ---- lifecycle -------------------------------------------------------------------------
    def boot(self, spec: SandboxSpec) -> BrokerEndpoint:
        self._spec = spec
        protect_host_process()
        try:
            self._dir = Path(tempfile.mkdtemp(prefix=f"{SANDBOX_DIR_PREFIX}{spec.sandbox_id}-", dir=self.base_dir))
            files = runtime_file_contents() | runtime_file_contents(("kernel.py",))
            for name, data in files.items():
                self.put_file(name, data)
            (self._dir / "inputs").mkdir()
            self._jail = ProcessJail(spec.sandbox_id, self.max_processes)
            limits = dict(self.limits, processes=self._jail.nproc_limit)
            env = scrubbed_environment(spec.sandbox_id, str(self._dir), self.extra_env)
            command = broker_command(
                self.python, str(self._dir), spec, port=0, parent_pid=os.getpid(),
                limits={k: v for k, v in limits.items() if v is not None and k != "as_bytes"},
            )
            self._broker = self._spawn([command[0], "-I", *command[1:]], env, "broker", stdin=subprocess.DEVNULL)
            port = self._read_port(self._broker)
            kernel_command = [
                self.python, "-I", str(self._dir / "kernel.py"),
                "--limits", json.dumps({k: v for k, v in limits.items() if v is not None}),
                "--parent-pid", str(os.getpid()),
            ]
            self._kernel = self._spawn(kernel_command, env, "kernel", stdin=subprocess.PIPE)
            threading.Thread(target=self._read_replies, args=(self._kernel,), daemon=True).start()
            ready = self._next_reply(self.boot_timeout)
            if ready is None or not json.loads(ready).get("ready"):
                raise SandboxStartError(f"the local sandbox kernel did not start (exit code {self._kernel.poll()})")
        except SandboxStartError:
            self.destroy()
            raise
        except (OSError, ValueError) as exc:
            self.destroy()
            raise SandboxStartError(f"could not start a local sandbox: {exc}") from exc
        url = f"http://127.0.0.1:{port}"
        return BrokerEndpoint(url=url, inside_url=url)

    def _spawn(self, command: list[str], env: dict[str, str], role: str, stdin) -> subprocess.Popen:
        process = subprocess.Popen(
            command,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=self._dir,
            env=env,
            start_new_session=True,  # its own process group: killed as one, never by the worker's Ctrl-C
            text=True,
        )
        assert self._jail is not None
        self._jail.admit(process.pid, role)
        return process

    def _read_port(self, broker: subprocess.Popen) -> int:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(broker.stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=self.boot_timeout)
        except queue.Empty:
            raise SandboxStartError(f"the sandbox broker did not start within {self.boot_timeout:g}s") from None
        if not line.startswith(PORT_ANNOUNCEMENT):
            raise SandboxStartError(f"the sandbox broker failed to start (exit code {broker.poll()}): {line!r}")
        return int(line.split()[1])

    def _read_replies(self, kernel: subprocess.Popen) -> None:
        for line in kernel.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def _next_reply(self, timeout: float) -> str | None:
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            raise SandboxTimeout(f"the local sandbox did not answer within {timeout:g}s") from None

    def put_file(self, relative_path: str, data: bytes) -> None:
        target = Path(self.runtime_dir) / relative_path
        partial = target.with_name(target.name + ".part")
        partial.write_bytes(data)
        partial.replace(target)  # sandbox code never sees half a file
        self.bytes_sent += len(data)

    def run_code(self, code: str, timeout: float) -> None:
        kernel = self._kernel
        if kernel is None or self._destroyed:
            raise SandboxDied("the local sandbox is not running")
        line = json.dumps({"code": code}) + "\n"
        try:
            kernel.stdin.write(line)
            kernel.stdin.flush()
        except (OSError, ValueError) as exc:
            raise SandboxDied(f"the sandbox process is gone (exit code {kernel.poll()}): {exc}") from exc
        self.bytes_sent += len(line.encode())
        try:
            reply = self._next_reply(timeout)
        except SandboxTimeout:
            self.destroy()
            raise SandboxTimeout(f"execution exceeded the {timeout:g}s limit; the sandbox was terminated") from None
        if reply is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                kernel.wait(timeout=2)
            raise SandboxDied(f"the sandbox process exited unexpectedly (exit code {kernel.poll()})")
        answer = json.loads(reply)
        if not answer.get("ok"):
            raise SandboxError(f"the sandbox runtime failed: {answer.get('error')}")

    def destroy(self) -> None:
        with self._destroy_lock:
            if self._destroyed:
                return
            self._destroyed = True
        for process in (self._kernel, self._broker):
            if process is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                    os.killpg(process.pid, 9)
        if self._jail is not None:
            self._jail.kill_all()
        for process in (self._kernel, self._broker):
            if process is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def destroy_local_sandbox(sandbox_id: str) -> None:
    """For reapers: kill what is left of a local sandbox on this machine and remove its directory."""
    ProcessJail.existing(sandbox_id).kill_all()
    for leftover in Path(tempfile.gettempdir()).glob(f"{SANDBOX_DIR_PREFIX}{sandbox_id}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if pids_with_marker(sandbox_id):
        raise SandboxError(f"processes of sandbox {sandbox_id} survived SIGKILL")
