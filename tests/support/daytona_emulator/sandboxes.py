"""The emulator's sandboxes: records, lifecycle (creating -> started -> stopped -> destroyed, auto-stop,
auto-delete, TTL) and the real isolation behind each one.

Each started sandbox is one bubblewrap, set up as the local backend sets up its own
(``broker_bridge/backends/bwrap.py``): new user, pid, ipc, uts, cgroup, mount and network namespaces
(its own loopback, so two sandboxes can both listen on 8765; no route out, so no host loopback),
read-only system files and Python, the snapshot's packages, no host environment, and a private home
(``/home/daytona``) kept on the host between stop and start. The agent (``agent.py``) is its only
process at start; it reaches the emulator through a Unix socket passed in as a file descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.support.daytona_emulator.agent_link import AgentLink
from tests.support.daytona_emulator.errors import ApiError, now_iso


def _load_backend_module(name: str) -> ModuleType:
    """A module of broker_bridge/backends loaded from its file: importing the package would load DSPy
    (seconds), and the emulator should start in well under one. Only stdlib modules qualify."""
    path = Path(__file__).resolve().parents[3] / "broker_bridge" / "backends" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_daytona_emulator_{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bwrap = _load_backend_module("bwrap")
host_writes = _load_backend_module("host_writes")

HOME = "/home/daytona"
OPT = "/opt/daytona"
AGENT_FILES = ("agent.py", "repl_worker.py")
DEFAULT_SNAPSHOT = "daytona-python"
# What each snapshot's Python can import besides the stdlib. "daytona-bare" has no Flask, so the
# backend's "make Flask importable" step fails there (no network to pip install from).
SNAPSHOTS: dict[str, tuple[str, ...]] = {DEFAULT_SNAPSHOT: bwrap.BROKER_PACKAGES + bwrap.DEFAULT_PACKAGES,
                                         "daytona-bare": ()}
READY_TIMEOUT = 30.0
TMP_BYTES = 512 * 1024 * 1024
PASSIVE = ("stopped", "destroyed", "error", "build_failed")


@dataclass
class Sandbox:
    id: str
    name: str
    org: str
    labels: dict[str, str]
    snapshot: str
    env: dict[str, str]
    public: bool = False
    network_block_all: bool = False
    target: str = "local"
    cpu: int = 1
    memory: int = 1
    disk: int = 3
    auto_stop: int = 15
    auto_archive: int = 10080
    auto_delete: int = -1
    ttl: int = 0
    state: str = "creating"
    error_reason: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.time)
    stopped_at: float | None = None
    preview_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    process: asyncio.subprocess.Process | None = None
    expected_exit: bool = False
    stderr_tail: deque = field(default_factory=lambda: deque(maxlen=20))

    @property
    def desired_state(self) -> str:
        return {"stopped": "stopped", "stopping": "stopped", "destroyed": "destroyed",
                "destroying": "destroyed"}.get(self.state, "started")


class Pool:
    """Every sandbox of the emulator, and the processes behind the started ones."""

    def __init__(self, state_dir: Path, base_url: str, emit: Callable[[Sandbox, str, dict], Awaitable[None]],
                 *, minute: float = 60.0, cpu_quota: int = 0, create_delay: float = 0.0,
                 start_hold: Callable[[], int | None] = lambda: None, owns_state_dir: bool = False) -> None:
        self.state_dir = state_dir
        self.base_url = base_url
        self.emit = emit  # (sandbox, event name, payload) -> socket.io
        self.minute = minute  # seconds per Daytona "minute" (intervals and TTL): tests shrink it
        self.cpu_quota = cpu_quota  # total vCPUs of an organization's running sandboxes; 0 = no limit
        self.create_delay = create_delay
        self.start_hold = start_hold  # the hold_start fault: an fd a starting bubblewrap blocks on, or None
        self.sandboxes: dict[str, Sandbox] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # the loop holds tasks weakly: one unreferenced may vanish
        # every bwrap started and not yet exited, whatever became of its sandbox's record: close() kills
        # them all (one started while its sandbox was being deleted once outlived the emulator)
        self._running: set[asyncio.subprocess.Process] = set()
        self._binary = bwrap.require_bwrap()
        self._opt = state_dir / "opt"
        self._opt.mkdir(parents=True, exist_ok=True)
        # Agents' sockets: host-only paths, short enough for sun_path (107 bytes) wherever the state is
        self._run_dir = Path(tempfile.mkdtemp(prefix="daytona-emulator-run-"))
        # a sandbox still in bwrap's setup when the emulator dies outlives it (janitor.py): this one ends them,
        # then removes what close() would have (the whole state directory when it is the emulator's own)
        litter = [self._run_dir, state_dir if owns_state_dir else state_dir / "homes"]
        self._janitor = subprocess.Popen(
            [sys.executable, "-m", "tests.support.daytona_emulator.janitor", "--watch", str(os.getpid()),
             "--marker", str(self._opt), *(f"--remove={path}" for path in litter)],
            cwd=Path(__file__).resolve().parents[3], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True)
        for name in AGENT_FILES:  # copied: the sandboxes see these, never the checkout
            shutil.copyfile(Path(__file__).with_name(name), self._opt / name)
        layout = bwrap.python_layout(sys.executable, tuple(dict.fromkeys(p for s in SNAPSHOTS.values() for p in s)))
        (self._opt / "bin").mkdir(exist_ok=True)
        for name in ("python3", "python"):  # the sandbox's python3 is the emulator's Python (one ABI)
            link = self._opt / "bin" / name
            if not link.is_symlink():
                link.symlink_to(layout.executable)
        self._layout = layout
        self._packages = {name: tuple(p for p in wanted if p in layout.packages)  # numpy only where installed
                          for name, wanted in SNAPSHOTS.items()}
        (state_dir / "homes").mkdir(exist_ok=True)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- lookups and views

    def socket_path(self, sandbox_id: str) -> Path:
        return self._run_dir / f"{sandbox_id}.sock"

    def link(self, sandbox: Sandbox) -> AgentLink:
        return AgentLink(self.socket_path(sandbox.id))

    def home(self, sandbox: Sandbox) -> Path:
        return self.state_dir / "homes" / sandbox.id

    def find(self, org: str, ref: str) -> Sandbox:
        sandbox = self.sandboxes.get(ref)
        if sandbox is None:
            sandbox = next((s for s in self.sandboxes.values() if s.name == ref and s.org == org), None)
        if sandbox is None or sandbox.org != org:
            raise ApiError(404, f"Sandbox with ID or name {ref} not found")
        return sandbox

    def dto(self, sandbox: Sandbox, *, full: bool = True) -> dict[str, Any]:
        item: dict[str, Any] = {
            "id": sandbox.id, "organizationId": sandbox.org, "name": sandbox.name, "snapshot": sandbox.snapshot,
            "user": "daytona", "labels": dict(sandbox.labels), "public": sandbox.public,
            "networkBlockAll": sandbox.network_block_all, "target": sandbox.target, "cpu": sandbox.cpu, "gpu": 0,
            "memory": sandbox.memory, "disk": sandbox.disk, "state": sandbox.state,
            "desiredState": sandbox.desired_state, "errorReason": sandbox.error_reason,
            "recoverable": False if sandbox.state == "error" else None, "backupState": "None",
            "autoStopInterval": sandbox.auto_stop, "autoArchiveInterval": sandbox.auto_archive,
            "autoDeleteInterval": sandbox.auto_delete, "autoPauseInterval": 0,
            "autoDestroyAt": now_iso(sandbox.created_at + sandbox.ttl * self.minute) if sandbox.ttl else None,
            "createdAt": now_iso(sandbox.created_at), "updatedAt": now_iso(sandbox.updated_at),
            "lastActivityAt": now_iso(sandbox.last_activity), "daemonVersion": "emulator",
            "runnerId": "emulator", "toolboxProxyUrl": f"{self.base_url}/toolbox",
        }
        if full:
            item.update(env=dict(sandbox.env), kvm=False, volumes=[])
        return item

    # ---------------------------------------------------------------- lifecycle

    async def create(self, org: str, body: dict[str, Any]) -> Sandbox:
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise ApiError(400, "name must be a non-empty string")
        if name and any(s.name == name and s.org == org and s.state not in ("destroyed", "destroying")
                        for s in self.sandboxes.values()):
            raise ApiError(409, f"Sandbox with name {name} already exists")
        snapshot = body.get("snapshot") or DEFAULT_SNAPSHOT
        if body.get("buildInfo"):  # an image: built into the default snapshot's contents
            snapshot = DEFAULT_SNAPSHOT
        if snapshot not in SNAPSHOTS:
            raise ApiError(400, f"Snapshot {snapshot} not found. Did you add it through the Daytona Dashboard?")
        cpu = int(body.get("cpu") or 1)
        if self.cpu_quota:
            used = sum(s.cpu for s in self.sandboxes.values() if s.org == org and s.state not in PASSIVE)
            if used + cpu > self.cpu_quota:
                raise ApiError(403, f"Total CPU limit exceeded. Maximum allowed: {self.cpu_quota}.\n"
                                    "To increase concurrency limits, upgrade your organization's Tier")
        labels = body.get("labels") or {}
        env = body.get("env") or {}
        if not all(isinstance(v, str) for v in {**labels, **env}.values()):
            raise ApiError(400, "labels and env values must be strings")
        sandbox_id = str(uuid.uuid4())
        sandbox = Sandbox(
            id=sandbox_id, name=name or sandbox_id, org=org, labels=dict(labels), snapshot=snapshot, env=dict(env),
            public=bool(body.get("public", False)), network_block_all=bool(body.get("networkBlockAll", False)),
            target=body.get("target") or "local", cpu=cpu, memory=int(body.get("memory") or 1),
            disk=int(body.get("disk") or 3), auto_stop=_minutes(body, "autoStopInterval", 15),
            auto_archive=_minutes(body, "autoArchiveInterval", 10080),
            auto_delete=_minutes(body, "autoDeleteInterval", -1, signed=True), ttl=_minutes(body, "ttlMinutes", 0))
        self.sandboxes[sandbox.id] = sandbox
        self.home(sandbox).mkdir(mode=0o755)
        await self.emit(sandbox, "sandbox.created", self.dto(sandbox))
        self._in_background(self._start(sandbox, delay=self.create_delay))
        return sandbox

    async def start(self, sandbox: Sandbox) -> None:
        if sandbox.state in ("started", "starting", "creating"):
            return
        if sandbox.state in ("destroyed", "destroying"):
            raise ApiError(400, f"Sandbox {sandbox.id} is destroyed")
        await self._set_state(sandbox, "starting")
        self._in_background(self._start(sandbox))

    async def _start(self, sandbox: Sandbox, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        try:
            await self._launch(sandbox)
        except Exception as exc:
            sandbox.error_reason = f"the sandbox failed to start: {exc}"
            await self._kill(sandbox)
            if sandbox.state not in ("destroyed", "destroying"):
                await self._set_state(sandbox, "error")
            return
        if sandbox.state in ("creating", "starting"):
            sandbox.last_activity = time.time()
            await self._set_state(sandbox, "started")
        else:  # stopped or deleted while it was starting
            await self._kill(sandbox)

    async def stop(self, sandbox: Sandbox) -> None:
        if sandbox.state in ("stopped", "destroyed", "destroying"):
            return
        await self._set_state(sandbox, "stopping")
        await self._kill(sandbox)
        sandbox.stopped_at = time.time()
        await self._set_state(sandbox, "stopped")

    async def delete(self, sandbox: Sandbox) -> None:
        if sandbox.state in ("destroyed", "destroying"):
            return
        await self._set_state(sandbox, "destroying")
        await self._kill(sandbox)
        await asyncio.get_running_loop().run_in_executor(None, host_writes.remove_tree, self.home(sandbox))
        await self._set_state(sandbox, "destroyed")
        self.sandboxes.pop(sandbox.id, None)  # then 404, as the SDK's delete(wait=True) expects

    async def kill(self, sandbox: Sandbox, what: str) -> int:
        """Fault: SIGKILL the sandbox's agent ("agent") or its whole bubblewrap ("sandbox")."""
        process = sandbox.process
        if process is None or process.returncode is not None:
            raise ApiError(400, f"sandbox {sandbox.id} has no running processes")
        if what == "sandbox":
            os.killpg(process.pid, signal.SIGKILL)
            return process.pid
        pid = _descendant_running(process.pid, f"{OPT}/agent.py")
        if pid is None:
            raise ApiError(400, f"the agent of sandbox {sandbox.id} was not found")
        os.kill(pid, signal.SIGKILL)
        return pid

    async def tick(self) -> None:
        """Auto-stop, auto-delete and TTL, measured in this emulator's minutes."""
        now = time.time()
        for sandbox in list(self.sandboxes.values()):
            if sandbox.state in ("destroyed", "destroying"):
                continue
            if sandbox.ttl and now >= sandbox.created_at + sandbox.ttl * self.minute:
                await self.delete(sandbox)
            elif (sandbox.state == "started" and sandbox.auto_stop > 0
                  and now - sandbox.last_activity >= sandbox.auto_stop * self.minute):
                await self.stop(sandbox)
            if (sandbox.state == "stopped" and sandbox.auto_delete >= 0 and sandbox.stopped_at is not None
                    and now - sandbox.stopped_at >= sandbox.auto_delete * self.minute):
                await self.delete(sandbox)

    async def close(self) -> None:
        for sandbox in list(self.sandboxes.values()):
            await self._kill(sandbox)
        for process in list(self._running):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        await asyncio.get_running_loop().run_in_executor(None, host_writes.remove_tree, self.state_dir / "homes")
        shutil.rmtree(self._run_dir, ignore_errors=True)

    async def _set_state(self, sandbox: Sandbox, state: str) -> None:
        old, sandbox.state, sandbox.updated_at = sandbox.state, state, time.time()
        if old != state:
            await self.emit(sandbox, "sandbox.state.updated",
                            {"sandbox": self.dto(sandbox), "oldState": old, "newState": state})

    # ---------------------------------------------------------------- processes

    def _environment(self, sandbox: Sandbox) -> dict[str, str]:
        env = {"HOME": HOME, "USER": "daytona", "LOGNAME": "daytona", "LANG": "C.UTF-8", "TERM": "xterm",
               "PATH": f"{OPT}/bin:/usr/local/bin:/usr/bin:/bin", "TMPDIR": "/tmp", "PYTHONUNBUFFERED": "1",
               "DAYTONA_SANDBOX_ID": sandbox.id, "DAYTONA_SANDBOX_USER": "daytona"}
        env.update(sandbox.env)  # what the creator asked for: Daytona puts it in the sandbox's environment
        return env

    async def _launch(self, sandbox: Sandbox) -> None:
        path = self.socket_path(sandbox.id)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hold: int | None = None
        try:
            listener.bind(str(path))
            listener.listen(256)
            env = self._environment(sandbox)
            packages = self._packages[sandbox.snapshot]
            binds = [(str(self.home(sandbox)), HOME, True), (str(self._opt), OPT, False)]
            argv = [sys.executable, f"{OPT}/agent.py", "--listen-fd", str(listener.fileno())]
            command = bwrap.sandbox_command(self._binary, self._layout, packages, env, binds, argv, cwd=HOME,
                                            tmp_bytes=TMP_BYTES)
            hold = self.start_hold()
            if hold is not None:  # bwrap reads it after its setup, before the agent runs
                command[1:1] = ["--block-fd", str(hold)]
            # Started from the event loop's thread, which lives as long as the emulator: bwrap's
            # --die-with-parent fires when the thread that forked it ends.
            sandbox.expected_exit = False
            sandbox.process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, pass_fds=(listener.fileno(), *(() if hold is None else (hold,))),
                start_new_session=True, env={"PATH": "/usr/bin:/bin"})
        finally:
            listener.close()  # the agent holds its own copy
            if hold is not None:
                os.close(hold)
        self._running.add(sandbox.process)
        self._in_background(self._watch(sandbox, sandbox.process))
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                await asyncio.wait_for(self.link(sandbox).call("ping"), timeout=max(0.1, deadline - time.monotonic()))
                return
            except (ApiError, asyncio.TimeoutError):
                if sandbox.process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bwrap exited ({sandbox.process.returncode}): "
                                       + " | ".join(sandbox.stderr_tail)) from None
                await asyncio.sleep(0.02)

    async def _watch(self, sandbox: Sandbox, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while True:  # bwrap's complaints; sandbox code may write here too, so read in bounded pieces
            data = await process.stderr.read(4096)
            if not data:
                break
            sandbox.stderr_tail.append(data.decode(errors="replace").strip()[:500])
        code = await process.wait()
        self._running.discard(process)
        if sandbox.process is process and not sandbox.expected_exit and sandbox.state == "started":
            sandbox.error_reason = f"the sandbox's processes exited (code {code})"
            await self._set_state(sandbox, "error")

    async def _kill(self, sandbox: Sandbox) -> None:
        process = sandbox.process
        if process is None:
            return
        sandbox.expected_exit = True
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # bwrap's --die-with-parent takes the namespace down
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), 10)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path(sandbox.id).unlink()


def _minutes(body: dict[str, Any], key: str, default: int, *, signed: bool = False) -> int:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or (value < 0 and not signed):
        raise ApiError(400, f"{key} must be a {'' if signed else 'non-negative '}integer")
    return value


def _descendant_running(root: int, needle: str) -> int | None:
    """The pid of a descendant of ``root`` whose command line contains ``needle`` (host /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    for pid in parents:
        ancestor, depth = parents.get(pid), 0
        while ancestor and ancestor != root and depth < 16:
            ancestor, depth = parents.get(ancestor), depth + 1
        if ancestor == root:
            with contextlib.suppress(OSError):
                if needle.encode() in (Path("/proc") / str(pid) / "cmdline").read_bytes():
                    return pid
    return None
