"""The local backend: a sandbox made of two processes on this machine (for development and tests).

The broker (``broker.py``) and a persistent Python context (``kernel.py``) run with a scrubbed
environment (no API keys, tokens or other secrets of the host), resource limits and a process cap.

Isolation ``namespaces`` (the default on Linux): each of the two runs in its own bubblewrap sandbox
(``bwrap.py``) with no network at all; the host and the kernel reach the broker over a Unix socket
in a directory the kernel can read but not change. Sandbox code sees its own ``/sandbox``, a private
``/tmp``, the stdlib and the packages it was given, and nothing else of the machine.

Isolation ``process`` (opt-in with ``isolation="process"``, rlmq's ``RLMQ_LOCAL_ISOLATION=process``,
where namespaces are missing and the operator accepts it): plain subprocesses on a loopback port. That
is no security boundary: sandbox code runs as the worker's user and can read and reach what that user can.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from broker_bridge.backends import bwrap
from broker_bridge.backends.base import (
    LOCAL_ISOLATIONS,
    BackendName,
    BrokerEndpoint,
    Isolation,
    Sandbox,
    SandboxDied,
    SandboxError,
    SandboxInfo,
    SandboxSpec,
    SandboxStartError,
    SandboxTimeout,
    broker_command,
    runtime_file_contents,
)
from broker_bridge.backends.host_writes import remove_tree, write_beneath
from broker_bridge.backends.process_jail import SANDBOX_MARKER_VAR, ProcessJail, pids_with_marker
from broker_bridge.sandbox.protocol import PORT_ANNOUNCEMENT, SOCKET_ANNOUNCEMENT, protect_host_process, unix_url

logger = logging.getLogger(__name__)

# Variables a sandbox may inherit; everything else (API keys, tokens, cloud credentials) stays out.
ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")
SECRET_NAME_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
SANDBOX_DIR_PREFIX = "rlmq-sandbox-"
SOCKET_NAME = "broker.sock"
INSIDE_PATH = "/usr/local/bin:/usr/bin:/bin"
_warned_process_mode = False
# bwrap --die-with-parent uses PR_SET_PDEATHSIG, which fires when the *thread* that started bwrap
# ends: start every sandbox from one thread that lives as long as the worker process.
_SPAWNER = ThreadPoolExecutor(1, thread_name_prefix="rlmq-sandbox-spawner")


def _new_spawner_after_fork() -> None:
    global _SPAWNER
    _SPAWNER = ThreadPoolExecutor(1, thread_name_prefix="rlmq-sandbox-spawner")  # the parent's thread is not here


os.register_at_fork(after_in_child=_new_spawner_after_fork)


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


def local_isolation(mode: Isolation | str) -> Isolation:
    """``mode`` as a local sandbox's isolation; a ValueError in one line for anything else."""
    try:
        isolation: Isolation | None = Isolation(mode)
    except ValueError:
        isolation = None
    if isolation is None or isolation not in LOCAL_ISOLATIONS:
        choices = ", ".join(i.value for i in LOCAL_ISOLATIONS)
        raise ValueError(f"local sandbox isolation must be one of {choices}, not {mode!r}")
    return isolation


class LocalSandbox(Sandbox):
    kind = BackendName.LOCAL

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
        isolation: Isolation | str = Isolation.NAMESPACES,
        packages: tuple[str, ...] | None = None,
        tmp_size_mb: int = 256,
    ) -> None:
        """``isolation``: "namespaces" (bubblewrap) or "process" (plain subprocesses, no security boundary).
        ``packages``: what sandbox code may import besides the stdlib under namespaces (default: numpy
        where installed); a named package that is not installed is an error at boot. ``tmp_size_mb``:
        the private /tmp under namespaces (a tmpfs, so memory)."""
        super().__init__()
        self.isolation = local_isolation(isolation)
        if isinstance(packages, str) or not all(
            isinstance(name, str) and all(part.isidentifier() for part in name.split(".")) for name in packages or ()
        ):
            raise ValueError(f"packages must be a list of importable names such as ('numpy',), not {packages!r}")
        self.packages = tuple(packages) if packages is not None else None
        self.tmp_bytes = tmp_size_mb * 1024 * 1024
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
        self._broker: subprocess.Popen[str] | None = None
        self._kernel: subprocess.Popen[str] | None = None
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._destroy_lock = threading.Lock()
        self._destroyed = False

    @property
    def namespaced(self) -> bool:
        return self.isolation is Isolation.NAMESPACES

    @property
    def host_dir(self) -> str:
        """The sandbox's writable directory as the host sees it (``runtime_dir`` is inside)."""
        if self._dir is None:
            raise SandboxError("the local sandbox has not been booted")
        return str(self._dir / "work" if self.namespaced else self._dir)

    @property
    def runtime_dir(self) -> str:
        return bwrap.INSIDE_DIR if self.namespaced and self._dir is not None else self.host_dir

    def info(self) -> SandboxInfo:
        assert self._spec is not None
        return SandboxInfo(backend=self.kind, sandbox_id=self._spec.sandbox_id, labels=dict(self._spec.labels),
                           isolation=self.isolation)

    # ---- lifecycle -------------------------------------------------------------------------
    def boot(self, spec: SandboxSpec) -> BrokerEndpoint:
        self._spec = spec
        protect_host_process()
        try:
            binary = bwrap.require_bwrap() if self.namespaced else None
        except bwrap.IsolationUnavailable as exc:
            raise SandboxStartError(str(exc)) from None
        if not self.namespaced:
            _warn_process_mode()
        try:
            self._dir = Path(tempfile.mkdtemp(prefix=f"{SANDBOX_DIR_PREFIX}{spec.sandbox_id}-", dir=self.base_dir))
            self._jail = ProcessJail(spec.sandbox_id, self.max_processes)
            if binary is None:
                endpoint = self._boot_processes(spec)
            else:
                endpoint = self._boot_namespaces(spec, binary)
            ready = self._next_reply(self.boot_timeout)
            assert self._kernel is not None  # started by either _boot_ method
            if ready is None or not json.loads(ready).get("ready"):
                raise SandboxStartError(
                    f"the local sandbox kernel did not start (exit code {self._kernel.poll()}){self._log_tail('kernel')}"
                )
            if binary is not None:  # bwrap forked before we could admit it: move the whole tree now
                self._jail.admit_tree(self._kernel.pid, "kernel")
        except SandboxStartError:
            self.destroy()
            raise
        except (OSError, ValueError, bwrap.IsolationUnavailable) as exc:
            self.destroy()
            raise SandboxStartError(f"could not start a local sandbox: {exc}") from exc
        return endpoint

    def _limits(self, nproc: int | None) -> dict[str, int]:
        return {k: v for k, v in dict(self.limits, processes=nproc).items() if v is not None}

    def _boot_processes(self, spec: SandboxSpec) -> BrokerEndpoint:
        """Isolation "process": two subprocesses on a loopback port (no security boundary)."""
        assert self._dir is not None and self._jail is not None
        for name, data in (runtime_file_contents() | runtime_file_contents(("kernel.py",))).items():
            self.put_file(name, data)
        (self._dir / "inputs").mkdir()
        limits = self._limits(self._jail.nproc_limit)
        env = scrubbed_environment(spec.sandbox_id, str(self._dir), self.extra_env)
        command = broker_command(
            self.python, str(self._dir), spec, port=0, parent_pid=os.getpid(),
            limits={k: v for k, v in limits.items() if k != "as_bytes"},
        )
        self._broker = self._spawn([command[0], "-I", *command[1:]], env, "broker", stdin=subprocess.DEVNULL)
        self._jail.admit(self._broker.pid, "broker")
        kernel_command = [
            self.python, "-I", str(self._dir / "kernel.py"),
            "--limits", json.dumps(limits), "--parent-pid", str(os.getpid()),
        ]
        self._kernel = self._spawn(kernel_command, env, "kernel", stdin=subprocess.PIPE)
        self._jail.admit(self._kernel.pid, "kernel")
        threading.Thread(target=self._read_replies, args=(self._kernel,), daemon=True).start()
        port = int(self._read_announcement(self._broker, PORT_ANNOUNCEMENT))  # both started meanwhile
        url = f"http://127.0.0.1:{port}"
        return BrokerEndpoint(url=url, inside_url=url)

    def _boot_namespaces(self, spec: SandboxSpec, binary: str) -> BrokerEndpoint:
        """Isolation "namespaces": the broker and the kernel each in a bwrap of their own, no network."""
        assert self._dir is not None and self._jail is not None
        work, broker_dir = self._dir / "work", self._dir / "broker"
        socket_path = broker_dir / SOCKET_NAME
        problem = bwrap.host_path_ok(socket_path)
        if problem:
            raise SandboxStartError(problem)
        for path in (work, work / "inputs", broker_dir):
            path.mkdir()
        for name, data in runtime_file_contents(("protocol.py", "runtime.py", "kernel.py")).items():
            self.put_file(name, data)
        for name, data in runtime_file_contents(("protocol.py", "broker.py")).items():
            (broker_dir / name).write_bytes(data)
        packages = self._sandbox_packages()
        layout = bwrap.python_layout(self.python, tuple(dict.fromkeys(bwrap.BROKER_PACKAGES + packages)))
        missing = bwrap.missing_packages(layout, bwrap.BROKER_PACKAGES + packages)
        if missing:
            raise SandboxStartError(f"package(s) not installed for {self.python}: {', '.join(missing)}")
        if self._jail.cgroup is not None:
            nproc = None
        else:  # counted per user namespace, so the cap is the sandbox's own (ignored when mapped to root)
            nproc = None if os.geteuid() == 0 else self.max_processes
        limits = self._limits(nproc)
        inside_socket = f"{bwrap.INSIDE_SOCKET_DIR}/{SOCKET_NAME}"

        broker_env = self._inside_env(spec, bwrap.INSIDE_SOCKET_DIR)
        argv = broker_command(self.python, bwrap.INSIDE_SOCKET_DIR, spec, unix_socket=inside_socket,
                              limits={k: v for k, v in limits.items() if k != "as_bytes"})
        command = bwrap.sandbox_command(binary, layout, bwrap.BROKER_PACKAGES, broker_env,
                                        [(str(broker_dir), bwrap.INSIDE_SOCKET_DIR, True)], argv,
                                        cwd=bwrap.INSIDE_SOCKET_DIR, tmp_bytes=16 * 1024 * 1024)
        self._broker = self._spawn(command, broker_env, "broker", stdin=subprocess.DEVNULL)

        kernel_env = self._inside_env(spec, bwrap.INSIDE_DIR)
        argv = [self.python, f"{bwrap.INSIDE_DIR}/kernel.py", "--limits", json.dumps(limits)]
        binds = [(str(work), bwrap.INSIDE_DIR, True), (str(broker_dir), bwrap.INSIDE_SOCKET_DIR, False)]
        command = bwrap.sandbox_command(binary, layout, packages, kernel_env, binds, argv, tmp_bytes=self.tmp_bytes)
        self._kernel = self._spawn(command, kernel_env, "kernel", stdin=subprocess.PIPE)
        threading.Thread(target=self._read_replies, args=(self._kernel,), daemon=True).start()
        self._read_announcement(self._broker, SOCKET_ANNOUNCEMENT)  # the kernel started meanwhile
        self._jail.admit_tree(self._broker.pid, "broker")
        return BrokerEndpoint(url=unix_url(str(socket_path)), inside_url=unix_url(inside_socket))

    def _sandbox_packages(self) -> tuple[str, ...]:
        if self.packages is not None:
            return self.packages
        layout = bwrap.python_layout(self.python, bwrap.DEFAULT_PACKAGES)
        return tuple(name for name in bwrap.DEFAULT_PACKAGES if name in layout.packages)

    def _inside_env(self, spec: SandboxSpec, home: str) -> dict[str, str]:
        env = scrubbed_environment(spec.sandbox_id, home, self.extra_env)
        env.update(PATH=INSIDE_PATH, TMPDIR="/tmp")  # the host's PATH names host directories
        return env

    def _spawn(self, command: list[str], env: dict[str, str], role: str, stdin: int) -> subprocess.Popen[str]:
        assert self._dir is not None
        # The broker's bwrap errors go to a host file for the boot error; never the kernel's: its bwrap
        # init stays in the sandbox's pid namespace, and a host file open there would be a way out.
        with contextlib.ExitStack() as closing:
            log = (closing.enter_context(open(self._dir / f"{role}.log", "wb"))
                   if self.namespaced and role == "broker" else subprocess.DEVNULL)
            return _SPAWNER.submit(
                subprocess.Popen,
                command,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=log,  # bwrap's own complaints, for the boot error (outside the sandbox's view)
                cwd=self._dir,
                env=env,
                start_new_session=True,  # its own process group: killed as one, never by the worker's Ctrl-C
                text=True,
                close_fds=True,
            ).result()

    def _log_tail(self, role: str) -> str:
        assert self._dir is not None
        try:
            lines = (self._dir / f"{role}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1]}" if lines else ""

    def _read_announcement(self, broker: subprocess.Popen[str], announcement: str) -> str:
        lines: queue.Queue[str] = queue.Queue()
        stdout = broker.stdout
        assert stdout is not None  # spawned with stdout=PIPE
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=self.boot_timeout)
        except queue.Empty:
            raise SandboxStartError(f"the sandbox broker did not start within {self.boot_timeout:g}s") from None
        if not line.startswith(announcement):
            raise SandboxStartError(
                f"the sandbox broker failed to start (exit code {broker.poll()}): {line!r}{self._log_tail('broker')}"
            )
        return line.split()[1]

    def _read_replies(self, kernel: subprocess.Popen[str]) -> None:
        assert kernel.stdout is not None  # spawned with stdout=PIPE
        for line in kernel.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def _next_reply(self, timeout: float) -> str | None:
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            raise SandboxTimeout(f"the local sandbox did not answer within {timeout:g}s") from None

    def put_file(self, relative_path: str, data: bytes | bytearray) -> None:
        try:
            write_beneath(Path(self.host_dir), relative_path, data)
        except OSError as exc:
            raise SandboxError(f"could not write {relative_path} into the sandbox: {exc}") from exc
        self.bytes_sent += len(data)

    def run_code(self, code: str, timeout: float) -> None:
        kernel = self._kernel
        if kernel is None or self._destroyed:
            raise SandboxDied("the local sandbox is not running")
        line = json.dumps({"code": code}) + "\n"
        assert kernel.stdin is not None  # spawned with stdin=PIPE
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
            remove_tree(self._dir)


def _warn_process_mode() -> None:
    global _warned_process_mode
    if not _warned_process_mode:
        _warned_process_mode = True
        logger.warning(
            "local sandboxes run with isolation \"process\": plain subprocesses, no security boundary "
            "(sandbox code can read the worker user's files and reach its network)"
        )


def local_isolation_problem(isolation: Isolation | str) -> str | None:
    """For worker start checks: why a local sandbox of ``isolation`` would refuse to start here, or None."""
    if local_isolation(isolation) is Isolation.PROCESS:
        return None
    binary, reason = bwrap.probe()
    return None if binary else f"{reason}; {bwrap.INSTALL_HINT}"


def destroy_local_sandbox(sandbox_id: str) -> None:
    """For reapers: kill what is left of a local sandbox on this machine and remove its directory."""
    ProcessJail.existing(sandbox_id).kill_all()
    for leftover in Path(tempfile.gettempdir()).glob(f"{SANDBOX_DIR_PREFIX}{sandbox_id}-*"):
        remove_tree(leftover)
    if pids_with_marker(sandbox_id):
        raise SandboxError(f"processes of sandbox {sandbox_id} survived SIGKILL")
