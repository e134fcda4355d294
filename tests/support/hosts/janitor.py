"""What the multi-host harness leaves behind, found by name and removed.

Every namespace the harness makes is named ``rlmqh-<owner pid>-<network>-<host>`` (the switch's
host part is ``sw``), so its owner can be read off the name. ``sweep`` removes the namespaces of
owners that are gone (or of one given owner): first every process still inside (SIGKILL, since a
namespace lives as long as a process holds it), then the name. The veth pairs are made inside
those namespaces, so they go with them; a link in this machine's own namespace carrying the
prefix (none should ever be there) is removed too. Nothing without the prefix is touched.

``python -m tests.support.hosts.janitor --watch PID`` waits for process PID to end, however it
ends (SIGKILL included, when no finaliser runs), then sweeps what PID owned: the harness starts
one such watcher per pytest process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["NETNS_DIR", "PREFIX", "kill_until_gone", "netns_name", "owned_namespaces", "processes_in", "sweep", "wait_for_exit"]

PREFIX = "rlmqh-"
NETNS_DIR = Path("/run/netns")
_NAME = re.compile(rf"^{PREFIX}(\d+)-")


def netns_name(owner: int, network: int, host: str) -> str:
    return f"{PREFIX}{owner}-{network}-{host}"


def _owner(name: str) -> int | None:
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owned_namespaces(owner: int | None = None) -> list[str]:
    """The harness's namespaces: all of them, or those of one owner pid."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []
    return [n for n in names if _owner(n) is not None and (owner is None or _owner(n) == owner)]


def processes_in(netns: str) -> list[int]:
    """Pids of every process whose network namespace is ``netns``."""
    try:
        inode = os.stat(NETNS_DIR / netns).st_ino
    except FileNotFoundError:
        return []
    wanted = f"net:[{inode}]"
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/net") == wanted:
                    pids.append(int(entry))
    return pids


def kill_namespace_processes(netns: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL everything inside ``netns`` and wait until it is gone; returns the pids still there."""
    return kill_until_gone(lambda: processes_in(netns), timeout)


def kill_until_gone(find: Callable[[], list[int]], timeout: float) -> list[int]:
    """SIGKILL the processes ``find`` names until it names none (a dying parent may fork one more);
    the pids still there at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        pids = find()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def _stale_root_links(owner: int | None) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.count(":") >= 2]
    stale = []
    for name in names:
        pid = _owner(name)
        if pid is not None and (pid == owner if owner is not None else not _alive(pid)):
            stale.append(name)
    return stale


def sweep(owner: int | None = None) -> list[str]:
    """Remove the namespaces (and any root-namespace links) of ``owner``, or else of every dead
    owner; returns what was removed. Processes still inside are killed first."""
    removed = []
    for name in owned_namespaces(owner):
        pid = _owner(name)
        if owner is None and pid is not None and _alive(pid):
            continue
        kill_namespace_processes(name)
        if subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False).returncode == 0:
            removed.append(name)
    for link in _stale_root_links(owner):
        if subprocess.run(["ip", "link", "del", link], capture_output=True, check=False).returncode == 0:
            removed.append(link)
    return removed


def wait_for_exit(pid: int) -> None:
    """Return once process ``pid`` has ended (at once if it is gone already)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watch", type=int, required=True, help="sweep what this pid owned once it ends")
    args = parser.parse_args()
    wait_for_exit(args.watch)
    sweep(args.watch)


if __name__ == "__main__":
    main()
