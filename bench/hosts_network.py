"""What the multi-host harness's network costs: round trips and bulk throughput between two hosts,
plain and with latency set (netem where the kernel has it, else the userspace NFQUEUE delayer).

    sudo python bench/hosts_network.py [--delay-ms 20] [--jitter-ms 5] [--seconds 3]
    sudo python bench/hosts_network.py --fanout 500 [--rounds 2] [--stub-latency 0.05] [--chunk-size 8 --fanout-width 64] [--llm-threads 32]

Prints, per setting: the median and 95th-percentile request/response round trip (a 100-byte
message echoed over one TCP connection, as a Redis command is), round trips per second, and bulk
TCP throughput (MB/s). Issue 19's latency test needs 20 ms ± 5 ms to cost what a real network
would: ~40 ms per round trip and little CPU beyond that.

With ``--fanout N``: issue 19's fleet across hosts (``tests.support.hosts.fleet``: Redis primary on a,
replica on b, workers on b and c, client and stub LLM on d, Redis through Sentinel) runs one
``llm_query_batched`` of N prompts per round, first with no latency between hosts, then with
``--delay-ms`` ± ``--jitter-ms`` on every packet; it prints the batch's prompts per second (the
stub's first to last sub-call) and the run's wall time, and the ratios of the throughputs (a row with the
latency backend at 0 ms gives the backend's own cost). ``--chunk-size`` / ``--fanout-width`` set the
workers' ``RLMQ_CHUNK_SIZE`` / ``RLMQ_FANOUT_WIDTH`` (0: their defaults); ``--llm-threads`` each llm
worker's ``-c`` (default 32; the prompts one worker has in flight at most). Per round it also prints the
Redis commands per prompt and when the sub-tasks started and ended, as the stub saw them.
"""

from __future__ import annotations

import re
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import command_line
from rlmq.settings import Settings
from tests.support.hosts import Host, Network, latency_backend, latency_missing, unavailable
from tests.support.hosts.fleet import HostsFleet, hosts_fleet
from tests.support.reliability import batch_step, submit, wait_status
from workers.fanout import plan_chunks

PORT_ECHO, PORT_SINK = 7100, 7101
QUESTION = re.compile(r"question (\d+) about")  # tests.support.reliability.batch_step's prompts


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


def command_counts(r: Any) -> dict[str, int]:
    """The primary's commands served so far, by name (``INFO commandstats``)."""
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in r.info("commandstats").items()}


def fanout_round(fleet: HostsFleet, r: Any, n: int, tag: str, chunking: tuple[int, int]) -> tuple[float, float]:
    """One run with one batch of ``n`` prompts: (the batch's prompts per second, the run's wall seconds).
    Prints the Redis commands the run cost per prompt (the primary's, every client's)."""
    seen = len(fleet.stub.requests)
    before = command_counts(r)
    started = time.monotonic()
    run_id, _ = submit(r, fleet.stub, ["print(items)", batch_step(n), "SUBMIT(answers=answers)"], tag=tag,
                       url=fleet.url())
    record = wait_status(r, run_id, timeout=600)
    wall = time.monotonic() - started
    if record.status.value != "SUCCEEDED":
        sys.exit(f"run {run_id} ended {record.status.value}: {record.error}")
    spent = {k: v - before.get(k, 0) for k, v in command_counts(r).items()}
    top = sorted(((v, k) for k, v in spent.items() if v), reverse=True)
    print(f"  redis commands per prompt {sum(spent.values()) / n:.1f}: "
          + " ".join(f"{k} {v / n:.2f}" for v, k in top[:12]), flush=True)
    asked = {int(m.group(1)): req.at for req in fleet.stub.requests[seen:]
             if "REPL" not in req.prompt and (m := QUESTION.search(req.prompt))}
    subs = list(asked.values())
    print_chunks(asked, n, min(subs), *chunking)
    return (len(subs) - 1) / (max(subs) - min(subs)), wall


def print_chunks(asked: dict[int, float], n: int, first: float, chunk_size: int, fanout_width: int) -> None:
    """Where the batch's time went, from the stub's side: when each sub-task's first prompt arrived
    (dispatch and delivery) and how long a sub-task took from its first prompt to its last."""
    defaults = Settings()
    starts, spans = [], []
    for a, b in plan_chunks(n, chunk_size or defaults.chunk_size, fanout_width or defaults.fanout_width):
        times = [asked[i] for i in range(a, b) if i in asked]
        if times:
            starts.append(min(times) - first)
            spans.append(max(times) - min(times))
    print(f"  {len(starts)} sub-tasks: first prompt at median {statistics.median(starts):.2f} s, last {max(starts):.2f} s "
          f"after the batch's first; first to last prompt median {statistics.median(spans):.2f} s, "
          f"max {max(spans):.2f} s", flush=True)


def fanout(args: Any) -> None:
    backend = latency_backend()
    if backend is None:
        sys.exit(f"latency: {latency_missing()}")
    chunking = (args.chunk_size, args.fanout_width)
    env = {name: str(value) for name, value in (("RLMQ_CHUNK_SIZE", args.chunk_size),
                                                 ("RLMQ_FANOUT_WIDTH", args.fanout_width)) if value}
    with Network() as net, hosts_fleet(net, llm_threads=args.llm_threads, env=env) as fleet, fleet.d.entered():
        fleet.stub.latency = args.stub_latency
        r = fleet.client()
        fanout_round(fleet, r, 8, "warm-up", chunking)  # imports, sandbox start, connections
        rates: dict[str, list[float]] = {}
        for n_round in range(args.rounds):
            # the 0-ms row is the latency backend's own cost (the userspace delayer handles every packet)
            for setting, (label, delay) in enumerate((("no latency", None), (f"{backend}, 0 ms", (0.0, 0.0)),
                                 (f"{backend}, {args.delay_ms:g} ± {args.jitter_ms:g} ms", (args.delay_ms, args.jitter_ms)))):
                if delay:
                    net.set_latency(*delay, backend=backend)
                rate, wall = fanout_round(fleet, r, args.fanout, f"round{n_round}-{setting}", chunking)
                net.clear_latency()
                rates.setdefault(label, []).append(rate)
                print(f"{label:<24} {args.fanout} prompts: {rate:7.1f} prompts/s  run {wall:6.1f} s", flush=True)
        plain, zero, delayed = (statistics.median(v) for v in rates.values())
        print(f"median prompts/s: no latency {plain:.1f}; {backend} 0 ms {zero:.1f} ({zero / plain:.0%}); "
              f"{args.delay_ms:g} ± {args.jitter_ms:g} ms {delayed:.1f} ({delayed / plain:.0%} of no latency, "
              f"{delayed / zero:.0%} of {backend} 0 ms)")
        r.close()


def main() -> None:
    args = command_line(__doc__, delay_ms=20.0, jitter_ms=5.0, seconds=3.0, fanout=0, rounds=2, stub_latency=0.05,
                        chunk_size=0, fanout_width=0, llm_threads=32)
    if unavailable():
        sys.exit(f"cannot make hosts here: {unavailable()}")
    if args.fanout:
        fanout(args)
        return
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
