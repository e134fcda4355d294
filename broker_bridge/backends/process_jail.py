"""Keeping a local sandbox's processes countable and killable.

Best: a pids cgroup of its own (a hard cap on processes and threads, and an exact list to kill),
available where the cgroup tree is writable (root on most Linux hosts and containers). Otherwise
RLIMIT_NPROC, which the kernel enforces per user and ignores for root, plus a scan of /proc for the
sandbox's environment marker. This is process isolation, not a security boundary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

SANDBOX_MARKER_VAR = "RLMQ_SANDBOX_ID"
_CGROUP_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))


def _writable_pids_root() -> Path | None:
    for root in _CGROUP_ROOTS:
        has_pids = (root / "pids.max").exists() or root.name == "pids" or "pids" in _read(root / "cgroup.controllers")
        if has_pids and (root / "cgroup.procs").exists() and os.access(root, os.W_OK):
            return root
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def process_cap_available() -> bool:
    """Whether a local sandbox's processes can be capped here (a pids cgroup, or RLIMIT_NPROC as non-root)."""
    return _writable_pids_root() is not None or os.geteuid() != 0


class ProcessJail:
    """The processes of one local sandbox.

    With cgroups, sandbox code (the kernel) gets a pids cgroup of its own inside the sandbox's, so a
    fork bomb exhausts only its own budget while the broker keeps serving.
    """

    ROLES = ("kernel", "broker")

    def __init__(self, sandbox_id: str, max_processes: int, *, create: bool = True) -> None:
        self.sandbox_id = sandbox_id
        self.max_processes = max_processes
        self.cgroup: Path | None = None
        root = _writable_pids_root()
        if root is None:
            return
        path = root / "rlmq" / sandbox_id
        if not create:
            self.cgroup = path if path.is_dir() else None
            return
        try:
            for role in self.ROLES:
                (path / role).mkdir(parents=True, exist_ok=True)
            (path / "kernel" / "pids.max").write_text(str(max_processes))
            self.cgroup = path
        except OSError:
            self.cgroup = None

    @classmethod
    def existing(cls, sandbox_id: str) -> ProcessJail:
        """The jail of a sandbox started elsewhere in this machine (for reapers)."""
        return cls(sandbox_id, 0, create=False)

    @property
    def nproc_limit(self) -> int | None:
        """RLIMIT_NPROC for the sandbox when no cgroup caps it (per user: count what the user runs already)."""
        if self.cgroup is not None or os.geteuid() == 0:
            return None
        return _tasks_of_user(os.getuid()) + self.max_processes

    def admit(self, pid: int, role: str) -> None:
        """Move a freshly started sandbox process into its cgroup before it runs any sandbox code."""
        if self.cgroup is not None:
            (self.cgroup / role / "cgroup.procs").write_text(str(pid))

    def admit_tree(self, pid: int, role: str) -> None:
        """``admit`` a process and its descendants: bwrap forks before the host can admit it, so its
        tree is moved once the sandbox is ready and before it runs any sandbox code."""
        if self.cgroup is None:
            return
        for member in [pid, *descendants(pid)]:
            with contextlib.suppress(OSError):  # one that exited meanwhile
                self.admit(member, role)

    def _cgroups(self) -> list[Path]:
        if self.cgroup is None:
            return []
        return [self.cgroup / role for role in self.ROLES] + [self.cgroup]

    def _grouped(self) -> set[int]:
        found: set[int] = set()
        for group in self._cgroups():
            found.update(int(p) for p in _read(group / "cgroup.procs").split())
        found.discard(os.getpid())
        return found

    def kill_all(self, settle_seconds: float = 5.0) -> None:
        """SIGKILL every process of the sandbox until none is left (a fork bomb keeps forking for a while).

        The cgroup's list is exact and cheap; the marker scan reads every process's environment on the
        machine (0.1 s with 800 processes, most of a short run's CPU when it ran on every round), so it
        runs once the group is empty, to find what left the group or ran without one."""
        deadline = time.monotonic() + settle_seconds
        while True:
            pids = self._grouped() or (pids_with_marker(self.sandbox_id) - {os.getpid()})
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        for group in self._cgroups():
            with contextlib.suppress(OSError):
                group.rmdir()


def pids_with_marker(sandbox_id: str | None = None) -> set[int]:
    """Processes whose starting environment carries this sandbox's marker (they may have left its
    group); with ``None``, the processes of every local sandbox on this machine."""
    return pids_with_env(f"{SANDBOX_MARKER_VAR}={sandbox_id}\0" if sandbox_id else f"{SANDBOX_MARKER_VAR}=")


def pids_with_env(entry: str) -> set[int]:
    """Processes whose starting environment (``/proc/<pid>/environ``) contains ``entry``."""
    needle = entry.encode()
    found = set()
    for proc in os.scandir("/proc"):
        if not proc.name.isdigit():
            continue
        try:
            with open(f"/proc/{proc.name}/environ", "rb") as handle:
                if needle in handle.read():
                    found.add(int(proc.name))
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``: from /proc/<pid>/task/<tid>/children where the kernel has
    it (a few reads), else from the parent field of every /proc/<pid>/stat."""
    found, todo = [], [pid]
    try:
        while todo:
            parent = todo.pop()
            for task in os.listdir(f"/proc/{parent}/task"):
                for child in map(int, Path(f"/proc/{parent}/task/{task}/children").read_text().split()):
                    found.append(child)
                    todo.append(child)
        return found
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}/task/{pid}/children") and os.path.exists(f"/proc/{pid}"):
            return _descendants_by_scan(pid)
        return found  # a process exited meanwhile


def _descendants_by_scan(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])  # the command name may contain spaces and ")"
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _tasks_of_user(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += sum(1 for _ in os.scandir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return count
