"""The multi-host harness does what fault tests will rely on: hosts reach each other, faults cut
exactly what they say, a lost Redis host fails over to its replica, and nothing is left behind —
not after a test that fails, not after a pytest that is killed outright."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.hosts import Host, Network, janitor
from tests.support.hosts.fixtures import require_latency
from tests.support.hosts.sentinel import MASTER_NAME, RedisSentinel
from tests.support.stub_llm import StubLLM

REPO = Path(__file__).resolve().parents[1]
PORT = 7000


class Listener:
    """A TCP server on a host that accepts and closes (enough to prove a path is open)."""

    def __init__(self, host: Host) -> None:
        with host.entered():
            self.sock = socket.create_server((host.ip, PORT))
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.sock.close()
        self.thread.join(2)


@pytest.fixture
def listeners(network: Network) -> Iterator[dict[str, Listener]]:
    network.add_hosts("a", "b", "c", "d")
    started = {name: Listener(host) for name, host in network.hosts.items()}
    yield started
    for listener in started.values():
        listener.close()


def connect_ms(src: Host, dst: Host, timeout: float = 0.3) -> float | None:
    """Milliseconds for a TCP connect from src to dst (one round trip), or None when it fails."""
    with src.entered():
        start = time.perf_counter()
        try:
            socket.create_connection((dst.ip, PORT), timeout=timeout).close()
        except OSError:
            return None
        return (time.perf_counter() - start) * 1000


def all_connected(times: list[float | None]) -> list[float]:
    """The times of connects that must all have succeeded."""
    assert None not in times, times
    return [ms for ms in times if ms is not None]


def reachable(src: Host, dst: Host) -> bool:
    return connect_ms(src, dst) is not None


def reachable_again(src: Host, dst: Host, within: float = 5.0) -> bool:
    """Reachable within a few seconds: after a link comes back, the hosts re-learn each other's
    MAC address (ARP) and a connect waits for its SYN's retransmission, as on a real network."""
    deadline = time.monotonic() + within
    while not reachable(src, dst):
        if time.monotonic() > deadline:
            return False
    return True


def test_four_hosts_reach_each_other(network: Network, listeners: dict[str, Listener]) -> None:
    hosts = list(network.hosts.values())
    assert len({h.ip for h in hosts}) == 4 and all(h.ip.startswith("198.18.") for h in hosts)
    unreachable = [(s.name, d.name) for s, d in itertools.permutations(hosts, 2) if not reachable(s, d)]
    assert unreachable == []


def _root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [line.split(":")[1].strip() for line in out.splitlines()]


def test_hosts_leave_this_machines_interfaces_alone(hosts_harness: None) -> None:
    before = _root_links()
    with Network() as net:
        a, _ = net.add_hosts("a", "b")
        assert _root_links() == before
        host_links = a.run(["ip", "-o", "link", "show"]).stdout.splitlines()
        assert [line.split(":")[1].strip().split("@")[0] for line in host_links] == ["lo", "eth0"]
    assert _root_links() == before


def test_cut_host_is_unreachable_until_restored(network: Network, listeners: dict[str, Listener]) -> None:
    a, b, c, _ = network.hosts.values()
    network.cut(a)
    assert not reachable(b, a) and not reachable(a, b)
    assert reachable(b, c), "a cut host must not take the others down"
    network.restore(a)
    assert reachable_again(b, a) and reachable_again(a, b)


def test_partition_separates_two_hosts_only(network: Network, listeners: dict[str, Listener]) -> None:
    a, b, c, d = network.hosts.values()
    network.partition(a, b)
    assert not reachable(a, b) and not reachable(b, a)
    assert all(reachable(x, y) for x, y in [(a, c), (c, a), (b, d), (d, b), (c, d)])
    network.heal(a, b)
    assert reachable_again(a, b) and reachable_again(b, a)


def test_latency_applies_to_every_pair(network: Network, listeners: dict[str, Listener]) -> None:
    require_latency()
    a, b, c, _ = network.hosts.values()
    network.set_latency(20, 5)
    during = [connect_ms(x, y, timeout=2) for x, y in [(a, b), (b, c), (c, a), (b, a)] for _ in range(5)]
    network.clear_latency()
    after = [connect_ms(a, b) for _ in range(5)]
    during_ms, after_ms = all_connected(during), all_connected(after)
    # each direction is delayed 20 ± 5 ms and a connect is one round trip: never under 30 ms, about 40
    # (the upper bound leaves room for a busy machine)
    assert min(during_ms) >= 30 and 35 < statistics.median(during_ms) < 70, during_ms
    assert statistics.median(after_ms) < 5, after_ms


def test_total_loss_cuts_every_pair_until_cleared(network: Network, listeners: dict[str, Listener]) -> None:
    require_latency()
    a, b, c, _ = network.hosts.values()
    network.set_latency(0, loss_pct=100)
    assert not reachable(a, b) and not reachable(c, a)
    network.clear_latency()
    assert reachable_again(a, b) and reachable_again(c, a)


def test_stub_llm_on_one_host_answers_another(network: Network) -> None:
    """The pattern the fault tests use for "D runs the stub LLM": its socket is opened on d."""
    b, d = network.add_hosts("b", "d")
    with d.entered():
        stub = StubLLM(host=d.ip).start()
    try:
        body = json.dumps({"model": "stub", "messages": [{"role": "user", "content": "hello"}]}).encode()
        request = urllib.request.Request(f"{stub.api_base}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy reaches the hosts
        with b.entered():
            reply = json.loads(direct.open(request, timeout=5).read())
        assert stub.api_base.startswith(f"http://{d.ip}:")
        assert reply["choices"][0]["message"]["content"] and len(stub.requests) == 1
    finally:
        stub.stop()


def test_power_off_kills_everything_on_the_host(network: Network, listeners: dict[str, Listener]) -> None:
    a, b, _, _ = network.hosts.values()
    # a process, and one that left its session (as a daemon or a sandbox would): both on host a
    tracked = a.spawn(["sleep", "300"], name="sleeper")
    a.spawn(["setsid", "-f", "sleep", "301"], name="escaper")
    deadline = time.monotonic() + 5
    while len(a.pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(a.pids()) >= 2, (a.pids(), tracked.pid, tracked.process.poll(), tracked.log_tail())
    network.power_off(a)
    assert a.pids() == [] and not tracked.alive
    assert not reachable(b, a)
    network.power_on(a)
    assert a.pids() == []


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan killed on a host waits a moment for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_closing_leaves_nothing(hosts_harness: None) -> None:
    with Network() as net:
        a, b = net.add_hosts("a", "b")
        pids = [a.spawn(["sleep", "300"], name="s").pid, b.spawn(["setsid", "-f", "sleep", "301"], name="s").pid]
        time.sleep(0.2)
        pids += a.pids() + b.pids()
        names = net.namespaces()
        assert set(names) <= set(janitor.owned_namespaces(os.getpid()))
    assert not set(names) & set(janitor.owned_namespaces())
    assert not [pid for pid in pids if _alive(pid)]
    assert not net.dir.exists()


def _other_owner_pid() -> int:
    """A pid that no process has (so a namespace named after it is stale)."""
    pid = 4_000_000
    while _alive(pid):
        pid -= 1
    return pid


def test_janitor_sweeps_only_stale_namespaces_with_its_prefix(hosts_harness: None) -> None:
    stale = janitor.netns_name(_other_owner_pid(), 1, "a")
    live = janitor.netns_name(os.getpid(), 999, "a")
    foreign = f"other-{os.getpid()}"
    made = [stale, live, foreign]
    try:
        for name in made:
            subprocess.run(["ip", "netns", "add", name], check=True)
        squatter = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "300"], start_new_session=True)
        deadline = time.monotonic() + 5
        while not janitor.processes_in(stale) and time.monotonic() < deadline:
            time.sleep(0.05)
        removed = janitor.sweep()
        squatter.wait(5)
        assert stale in removed and squatter.returncode == -signal.SIGKILL
        assert set(os.listdir(janitor.NETNS_DIR)) >= {live, foreign}, "a live owner's and a foreign namespace stay"
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


INNER_TEST = """
import json, os, pathlib
from tests.support.hosts.fixtures import hosts_harness, network  # noqa: F401

def test_fails_with_hosts_running(network):
    a, b = network.add_hosts("a", "b")
    a.spawn(["sleep", "300"], name="s")
    b.spawn(["setsid", "-f", "sleep", "301"], name="s")
    import time; time.sleep(0.3)
    pathlib.Path({out!r}).write_text(json.dumps({{"netns": network.namespaces(), "pids": a.pids() + b.pids()}}))
    assert False, "this test fails on purpose"
"""

KILLED_SESSION = """
import json, os, pathlib, signal, time
from tests.support.hosts import Network
net = Network()
a, b = net.add_hosts("a", "b")
a.spawn(["sleep", "300"], name="s")
time.sleep(0.3)
pathlib.Path({out!r}).write_text(json.dumps({{"netns": net.namespaces(), "pids": a.pids()}}))
os.kill(os.getpid(), signal.SIGKILL)
"""


def _left_behind(record: Path, wait: float) -> tuple[list[str], list[int]]:
    seen = json.loads(record.read_text())
    deadline = time.monotonic() + wait
    while True:
        netns = [n for n in seen["netns"] if n in janitor.owned_namespaces()]
        pids = [p for p in seen["pids"] if _alive(p)]
        if not (netns or pids) or time.monotonic() > deadline:
            return netns, pids
        time.sleep(0.1)


@pytest.mark.slow
def test_a_failing_test_still_cleans_up(hosts_harness: None, tmp_path: Path) -> None:
    record = tmp_path / "seen.json"
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(textwrap.dedent(INNER_TEST.format(out=str(record))))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(test_file)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "this test fails on purpose" in done.stdout, done.stdout[-2000:]
    netns, pids = _left_behind(record, wait=0)  # the fixture's finaliser, not the watcher, cleaned up
    assert len(json.loads(record.read_text())["netns"]) == 3 and netns == [] and pids == []


@pytest.mark.slow
def test_a_killed_session_is_swept_by_its_watcher(hosts_harness: None, tmp_path: Path) -> None:
    record = tmp_path / "seen.json"
    done = subprocess.run([sys.executable, "-c", KILLED_SESSION.format(out=str(record))], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    netns, pids = _left_behind(record, wait=15)
    assert netns == [] and pids == []


@pytest.mark.slow
def test_losing_the_primary_host_fails_over_to_the_replica(network: Network) -> None:
    a, b, c, d = network.add_hosts("a", "b", "c", "d")
    group = RedisSentinel(primary=a, replicas=[b], sentinels=[a, b, c]).start()
    with d.entered():
        sentinel = group.client()
        primary = sentinel.master_for(MASTER_NAME)
        assert sentinel.discover_master(MASTER_NAME) == (a.ip, 6379)
        primary.set("before", "1")
        assert primary.wait(1, 1500) == 1  # the replica has it (within the client's 2 s socket timeout)
    with pytest.raises(redis.AuthenticationError), d.entered():  # a client without the password is refused
        # (no retries: redis-py 8 retries even a refused login, for about 4 s)
        redis.Redis(host=a.ip, port=6379, socket_timeout=2, retry=Retry(NoBackoff(), 0)).set("x", "1")

    lost_at = time.monotonic()
    network.power_off(a)
    new_primary = group.wait_failover(via=d, away_from=a)
    assert new_primary == (b.ip, 6379)
    with d.entered():  # the same client finds the new primary and writes
        deadline = time.monotonic() + 20
        while True:
            try:
                primary.set("after", "2")
                break
            except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        recovered = time.monotonic() - lost_at
        assert primary.get("before") == b"1" and primary.get("after") == b"2"
        assert primary.connection_pool.get_master_address() == (b.ip, 6379)
    print(f"writes resumed {recovered:.1f} s after the primary's host was lost")
    assert recovered < 20


@pytest.mark.slow
def test_celery_url_reaches_the_primary_through_sentinel(network: Network) -> None:
    """kombu (broker) and Celery's result backend find the primary from the URL and options."""
    from celery import Celery
    from kombu import Connection

    a, b, c, d = network.add_hosts("a", "b", "c", "d")
    group = RedisSentinel(primary=a, replicas=[b], sentinels=[a, b, c]).start()
    url = group.celery_url()
    assert url.count("sentinel://") == 3 and url.endswith("/0") and group.password in url.split(";")[0]
    assert group.sentinel_password not in url
    with d.entered():
        with Connection(url, transport_options=group.transport_options()) as conn:
            queue = conn.SimpleQueue("harness-check")
            queue.put({"hello": "hosts"})
            message = queue.get(timeout=5)
            assert message.payload == {"hello": "hosts"}
            message.ack()
            queue.close()
        app = Celery("harness-check", broker=url, backend=url)
        app.conf.result_backend_transport_options = group.transport_options()
        app.backend.set("harness-check-key", "stored")
        assert app.backend.get("harness-check-key") == b"stored"
        assert app.backend.client.connection_pool.get_master_address() == (a.ip, 6379)
        app.close()
