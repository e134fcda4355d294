"""Hosts for multi-host tests: Linux network namespaces plugged into one switch, with faults to inject.

``Network()`` makes the switch, a bridge inside a namespace of its own (nothing touches this
machine's interfaces), and ``add_host(name)`` plugs in a host: a namespace whose ``eth0`` is one
end of a veth pair, the other end a port of the bridge, with an address in 198.18.0.0/15 (RFC
2544's benchmarking range, routed nowhere). Nothing here sends a packet anywhere but these hosts.

A host runs processes (``Host.spawn``: argv, env, cwd, log file) that the network tracks and
kills; ``with host.entered():`` makes the sockets this thread opens meanwhile (a redis-py client,
a listener) sockets *on that host*, so a test can talk to the hosts directly.

Faults, each undone by its pair:
- ``cut(host)`` / ``restore(host)``: the host's switch port goes down, as if its cable were
  pulled: what it sends vanishes and nothing reaches it (it sees NO-CARRIER).
- ``partition(a, b)`` / ``heal(a, b)``: a and b lose each other, and only each other: each one's
  neighbour entry for the other points at a MAC address no host has, so their frames go out and
  vanish on the switch. Needs nothing but iproute2 (no netem, no firewall).
- ``set_latency(delay_ms, jitter_ms, loss_pct)`` / ``clear_latency()``: each packet between two
  hosts is delayed once (a round trip takes twice the delay): ``tc netem`` on every host's
  ``eth0`` where the kernel has sch_netem, else the switch queues every packet it forwards to a
  userspace delayer (``delayer``, NFQUEUE via iptables). ``latency_missing()`` says why neither
  can be had.
- ``power_off(host)`` / ``power_on(host)``: cut the host, then SIGKILL every process in its
  namespace; powering on restores the link (what it ran stays dead, as after a reboot).

Cleanup: ``close()`` (also ``with`` and interpreter exit) kills every process in every namespace
of the network and deletes the namespaces, which takes the veth pairs and the bridge with them.
A pytest killed outright runs no finaliser: the watcher started with the first network (see
``janitor``) sweeps this process's namespaces when it ends, and ``janitor.sweep()`` at the next
session start removes any whose owner is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from rlmq.stack import ChildProcess
from tests.support.hosts import janitor

__all__ = ["Host", "HostProcess", "Network", "latency_backend", "latency_missing", "unavailable"]

SUBNET_PREFIX = "198.18.0."  # host n gets .n (within 198.18.0.0/15)
PREFIX_LEN = 24
NOWHERE_MAC = "02:00:00:00:00:00"  # locally administered; no veth is given it
_HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_networks = itertools.count(1)  # 0 is the probe's
_CLONE_NEWNET = 0x40000000
_REPO = Path(__file__).resolve().parents[3]


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


@cache
def _probe() -> tuple[str | None, str | None, str | None]:
    """(why hosts cannot be made here, why netem cannot be used, why the NFQUEUE delayer cannot
    be used) — None where it can."""
    if not sys.platform.startswith("linux"):
        return "the multi-host harness needs Linux network namespaces", "no Linux", "no Linux"
    if os.geteuid() != 0:
        why = "the multi-host harness needs root (it makes network namespaces and veth pairs)"
        return why, why, why
    for tool in ("ip", "tc", "bridge"):
        if shutil.which(tool) is None:
            why = f"`{tool}` (iproute2) is not installed: apt-get install iproute2"
            return why, why, why
    name = janitor.netns_name(os.getpid(), 0, "probe")
    made = _run("ip", "netns", "add", name, check=False)
    if made.returncode != 0:
        why = f"`ip netns add` is not permitted here: {made.stderr.strip()}"
        return why, why, why
    try:
        for argv in (("ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"),
                     ("ip", "-n", name, "link", "add", "br0", "type", "bridge")):
            done = _run(*argv, check=False)
            if done.returncode != 0:
                why = f"`{' '.join(argv[3:])}` failed in a namespace: {done.stderr.strip()}"
                return why, why, why
        _run("ip", "-n", name, "link", "set", "lo", "up")
        netem = _run("tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False)
        why_not_netem = None if netem.returncode == 0 else (
            f"this kernel has no tc netem (sch_netem): {netem.stderr.strip()}")
        why_not_queue: str | None
        if shutil.which("iptables") is None:
            why_not_queue = "`iptables` is not installed (apt-get install iptables)"
        else:
            queue = _run("ip", "netns", "exec", name, *_queue_rule("-A"), check=False)
            why_not_queue = None if queue.returncode == 0 else (
                f"iptables cannot queue packets to userspace (NFQUEUE): {queue.stderr.strip()}")
        return None, why_not_netem, why_not_queue
    finally:
        _run("ip", "netns", "del", name, check=False)


def _queue_rule(action: str) -> tuple[str, ...]:
    """The switch's rule handing every forwarded IPv4 packet to the delayer (queue 0)."""
    return ("iptables", "-w", action, "FORWARD", "-j", "NFQUEUE", "--queue-num", "0")


def unavailable() -> str | None:
    """Why hosts cannot be made on this machine (one line), or None."""
    return _probe()[0]


def latency_backend() -> str | None:
    """How ``set_latency`` works here: "netem", "nfqueue" (the userspace delayer), or None."""
    why, why_netem, why_queue = _probe()
    if why:
        return None
    return "netem" if why_netem is None else "nfqueue" if why_queue is None else None


def latency_missing() -> str | None:
    """Why latency and loss cannot be set here (one line), or None."""
    why, why_netem, why_queue = _probe()
    if why:
        return why
    return None if latency_backend() else f"{why_netem}; and {why_queue}"


_watcher: subprocess.Popen[bytes] | None = None
_watcher_lock = threading.Lock()


def _ensure_watcher() -> None:
    """One janitor per process, sweeping its namespaces once it ends (even by SIGKILL)."""
    global _watcher
    with _watcher_lock:
        if _watcher is None or _watcher.poll() is not None:
            _watcher = subprocess.Popen(
                [sys.executable, "-m", "tests.support.hosts.janitor", "--watch", str(os.getpid())],
                cwd=str(_REPO), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)


def _setns(fd: int) -> None:
    if sys.version_info >= (3, 12):
        os.setns(fd, os.CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class HostProcess(ChildProcess):
    """A process started on a host (its own session: signals go to its whole process group)."""

    host: Host | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Send ``sig`` to the process group; for SIGKILL also wait until it is gone."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)
        if sig == signal.SIGKILL:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)


@dataclass
class Host:
    name: str
    ip: str
    netns: str
    dir: Path  # this host's own directory (data, logs)
    network: Network = field(repr=False)

    def spawn(self, argv: list[str], *, name: str, env: dict[str, str] | None = None, cwd: str | None = None,
              log: Path | None = None, inherit_env: bool = True) -> HostProcess:
        """Start ``argv`` on this host; its output goes to ``log`` (default ``<host dir>/<name>.log``)."""
        return self.network._spawn(self.netns, argv, name=f"{self.name}/{name}", host=self,
                                   log=log or self.dir / f"{name}.log", env=env, cwd=cwd, inherit_env=inherit_env)

    def run(self, argv: list[str], *, timeout: float = 30.0, check: bool = True, env: dict[str, str] | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a short command on this host and wait for it (``env``: its whole environment)."""
        done = subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True,
                              timeout=timeout, check=False, env=env, cwd=cwd)
        if check and done.returncode != 0:
            raise RuntimeError(f"on {self.name}: {' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
        return done

    @contextlib.contextmanager
    def entered(self) -> Iterator[Host]:
        """Within the block, sockets this thread opens are opened on this host. They stay there
        afterwards; a client that reconnects later must do so inside such a block too."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(janitor.NETNS_DIR / self.netns, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield self
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)

    def pids(self) -> list[int]:
        """Every process running on this host (in its namespace), tracked or not."""
        return janitor.processes_in(self.netns)

    def kill_all(self) -> None:
        """SIGKILL every process on this host and wait until they are gone."""
        left = janitor.kill_namespace_processes(self.netns)
        for child in self.network.processes:
            if child.host is self:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(5)
        if left:
            raise RuntimeError(f"processes on {self.name} survived SIGKILL: {left}")


class Network:
    """A switch and the hosts plugged into it; ``close()`` removes all of it."""

    def __init__(self) -> None:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        self.owner = os.getpid()
        self.index = next(_networks)
        self.dir = Path(tempfile.mkdtemp(prefix="rlmq-hosts-"))
        self.switch = janitor.netns_name(self.owner, self.index, "sw")
        self.hosts: dict[str, Host] = {}
        self.processes: list[HostProcess] = []
        self._partitions: set[frozenset[str]] = set()
        self._delayer: HostProcess | None = None
        self._closed = False
        _ensure_watcher()
        atexit.register(self.close)
        try:
            _run("ip", "netns", "add", self.switch)
            self._ip(self.switch, "link", "set", "lo", "up")
            self._ip(self.switch, "link", "add", "br0", "type", "bridge")
            self._ip(self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _spawn(self, netns: str, argv: list[str], *, name: str, host: Host | None, log: Path,
               env: dict[str, str] | None = None, cwd: str | None = None, inherit_env: bool = True) -> HostProcess:
        full_env = {**(os.environ if inherit_env else {}), **(env or {})}
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], env=full_env, cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        child = HostProcess(name=name, process=proc, log_path=log, host=host)
        self.processes.append(child)
        return child

    @staticmethod
    def _ip(netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "-n", netns, *argv, check=check)

    def namespaces(self) -> list[str]:
        return [self.switch, *(h.netns for h in self.hosts.values())]

    def add_host(self, name: str) -> Host:
        if not _HOST_NAME.match(name) or name in self.hosts or name == "sw":
            raise ValueError(f"host name {name!r}: a new lowercase name of 1-8 letters/digits, not 'sw'")
        host = Host(name=name, ip=f"{SUBNET_PREFIX}{len(self.hosts) + 1}",
                    netns=janitor.netns_name(self.owner, self.index, name), dir=self.dir / name, network=self)
        host.dir.mkdir()
        _run("ip", "netns", "add", host.netns)
        self.hosts[name] = host
        self._ip(host.netns, "link", "set", "lo", "up")
        # Both ends are made inside their namespaces: no link ever appears in this machine's own.
        _run("ip", "link", "add", "eth0", "netns", host.netns, "type", "veth", "peer", "name", name,
             "netns", self.switch)
        self._ip(host.netns, "addr", "add", f"{host.ip}/{PREFIX_LEN}", "dev", "eth0")
        self._ip(host.netns, "link", "set", "eth0", "up")
        self._ip(self.switch, "link", "set", "dev", name, "master", "br0")
        self._ip(self.switch, "link", "set", "dev", name, "up")
        return host

    def add_hosts(self, *names: str) -> list[Host]:
        return [self.add_host(name) for name in names]

    def _host(self, host: Host | str) -> Host:
        return self.hosts[host] if isinstance(host, str) else host

    # -- faults ---------------------------------------------------------------------------------

    def cut(self, host: Host | str) -> None:
        self._ip(self.switch, "link", "set", "dev", self._host(host).name, "down")

    def restore(self, host: Host | str, timeout: float = 5.0) -> None:
        """Bring the host's port back up, and return once packets flow (the kernel turns a
        carrier on asynchronously, up to a second later)."""
        host = self._host(host)
        self._ip(self.switch, "link", "set", "dev", host.name, "up")
        deadline = time.monotonic() + timeout
        while True:
            port = _run("bridge", "-n", self.switch, "link", "show", "dev", host.name).stdout
            nic = self._ip(host.netns, "-o", "link", "show", "dev", "eth0").stdout
            if "state forwarding" in port and "state UP" in nic:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{host.name}'s link did not come back within {timeout:.0f}s: {port} {nic}")
            time.sleep(0.02)

    def partition(self, a: Host | str, b: Host | str) -> None:
        a, b = self._host(a), self._host(b)
        for here, there in ((a, b), (b, a)):
            self._ip(here.netns, "neigh", "replace", there.ip, "lladdr", NOWHERE_MAC, "dev", "eth0", "nud", "permanent")
        self._partitions.add(frozenset((a.name, b.name)))

    def heal(self, a: Host | str, b: Host | str) -> None:
        a, b = self._host(a), self._host(b)
        for here, there in ((a, b), (b, a)):
            self._ip(here.netns, "neigh", "del", there.ip, "dev", "eth0", check=False)
        self._partitions.discard(frozenset((a.name, b.name)))

    def heal_all(self) -> None:
        for pair in list(self._partitions):
            self.heal(*sorted(pair))

    def set_latency(self, delay_ms: float, jitter_ms: float = 0.0, loss_pct: float = 0.0,
                    backend: str | None = None) -> None:
        """Delay every packet between hosts by ``delay_ms`` (± ``jitter_ms``, uniform) and drop
        ``loss_pct`` %: with netem where the kernel has it, else with the userspace delayer."""
        backend = backend or latency_backend()
        if backend is None:
            raise RuntimeError(latency_missing())
        self.clear_latency()
        if backend == "netem":
            for host in self.hosts.values():
                _run("tc", "-n", host.netns, "qdisc", "replace", "dev", "eth0", "root", "netem",
                     "delay", f"{delay_ms}ms", f"{jitter_ms}ms", "loss", f"{loss_pct}%")
            return
        self._delayer = self._spawn(
            self.switch, [sys.executable, "-m", "tests.support.hosts.delayer", "--delay-ms", str(delay_ms),
                          "--jitter-ms", str(jitter_ms), "--loss-pct", str(loss_pct)],
            name="switch/delayer", host=None, log=self.dir / "delayer.log", cwd=str(_REPO))
        deadline = time.monotonic() + 15
        while "bound" not in self._delayer.log_tail(5):
            if not self._delayer.alive or time.monotonic() > deadline:
                raise RuntimeError(f"the delayer did not start: {self._delayer.log_tail()}")
            time.sleep(0.02)
        _run("ip", "netns", "exec", self.switch, *_queue_rule("-A"))

    def clear_latency(self) -> None:
        for host in self.hosts.values():
            _run("tc", "-n", host.netns, "qdisc", "del", "dev", "eth0", "root", check=False)
        if self._delayer is not None:
            _run("ip", "netns", "exec", self.switch, *_queue_rule("-D"), check=False)
            self._delayer.stop(grace=0)
            self._delayer = None

    def delayer_alive(self) -> bool | None:
        """Whether the userspace delayer still runs (None when none was started)."""
        return None if self._delayer is None else self._delayer.alive

    def power_off(self, host: Host | str) -> None:
        host = self._host(host)
        self.cut(host)  # first: a host losing power sends nothing, not even the FIN of a killed process
        host.kill_all()

    def power_on(self, host: Host | str) -> None:
        self.restore(host)

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process, delete every namespace (links and bridge go with them). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for child in self.processes:
            child.stop(grace=0)
        survivors = []
        for netns in self.namespaces():
            survivors += janitor.kill_namespace_processes(netns)
            _run("ip", "netns", "del", netns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.close)
        if survivors:
            raise RuntimeError(f"processes survived SIGKILL in the hosts' namespaces: {survivors}")

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
