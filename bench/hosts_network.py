"""What the multi-host harness's network costs: round trips and bulk throughput between two hosts,
plain and with latency set (netem where the kernel has it, else the userspace NFQUEUE delayer).

    sudo python bench/hosts_network.py [--delay-ms 20] [--jitter-ms 5] [--seconds 3]

Prints, per setting: the median and 95th-percentile request/response round trip (a 100-byte
message echoed over one TCP connection, as a Redis command is), round trips per second, and bulk
TCP throughput (MB/s). Issue 19's latency test needs 20 ms ± 5 ms to cost what a real network
would: ~40 ms per round trip and little CPU beyond that.
"""

from __future__ import annotations

import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import command_line
from tests.support.hosts import Host, Network, latency_backend, latency_missing, unavailable

PORT_ECHO, PORT_SINK = 7100, 7101


def serve(host: Host) -> list[socket.socket]:
    with host.entered():
        echo = socket.create_server((host.ip, PORT_ECHO))
        sink = socket.create_server((host.ip, PORT_SINK))

    for server, handle in ((echo, echo_back), (sink, swallow)):
        threading.Thread(target=accept_until_closed, args=(server, handle), daemon=True).start()
    return [echo, sink]


def accept_until_closed(server: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:  # closed
            return
        with conn:
            handle(conn)


def echo_back(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def swallow(conn: socket.socket) -> None:
    while conn.recv(1 << 20):
        pass


def round_trips(src: Host, dst: Host, seconds: float) -> list[float]:
    with src.entered():
        conn = socket.create_connection((dst.ip, PORT_ECHO), timeout=5)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times, message = [], b"x" * 100
    end = time.monotonic() + seconds
    with conn:
        while time.monotonic() < end:
            start = time.perf_counter()
            conn.sendall(message)
            got = 0
            while got < len(message):
                got += len(conn.recv(65536))
            times.append((time.perf_counter() - start) * 1000)
    return times


def throughput(src: Host, dst: Host, seconds: float) -> float:
    with src.entered():
        conn = socket.create_connection((dst.ip, PORT_SINK), timeout=5)
    block, sent = b"\0" * (1 << 20), 0
    end = time.monotonic() + seconds
    with conn:
        while time.monotonic() < end:
            conn.sendall(block)
            sent += len(block)
    return sent / seconds / 1e6


def report(label: str, src: Host, dst: Host, seconds: float) -> None:
    rtts = round_trips(src, dst, seconds)
    p95 = statistics.quantiles(rtts, n=20)[-1]
    print(f"{label:<34} rtt median {statistics.median(rtts):7.2f} ms  p95 {p95:7.2f} ms  "
          f"{len(rtts) / seconds:8.0f} rt/s  bulk {throughput(src, dst, seconds):8.1f} MB/s", flush=True)


def main() -> None:
    args = command_line(__doc__, delay_ms=20.0, jitter_ms=5.0, seconds=3.0)
    if unavailable():
        sys.exit(f"cannot make hosts here: {unavailable()}")
    with Network() as net:
        a, b = net.add_hosts("a", "b")
        servers = serve(b)
        report("no latency", a, b, args.seconds)
        if latency_missing():
            print(f"latency: {latency_missing()}")
        else:
            backend = latency_backend()
            net.set_latency(0, backend=backend)
            report(f"{backend}, 0 ms", a, b, args.seconds)
            net.set_latency(args.delay_ms, args.jitter_ms, backend=backend)
            report(f"{backend}, {args.delay_ms:g} ± {args.jitter_ms:g} ms", a, b, args.seconds)
            net.clear_latency()
        for server in servers:
            server.close()


if __name__ == "__main__":
    main()
