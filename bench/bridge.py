"""Sandbox bridge benchmark: start time, tool-call latency, throughput, bytes sent.

    python bench/bridge.py [--calls 500] [--iterations 40] [--starts 10]
    python bench/bridge.py --backend daytona [--latencies 0,20,80] [--proxy-calls 100]

Local backend: each latency figure is measured in both local isolation modes: "process" (plain
subprocesses, a loopback port) and "namespaces" (bubblewrap, a Unix socket). Targets: median no-op
round trip under 3 ms (issue 2); sandbox start under 300 ms (issue 7); bytes sent over a 40-iteration
run under 1.1 x the corpus size.

Daytona backend (the emulator, ``tests/support/daytona_emulator``): one sandbox, its broker reached
through the preview proxy with each latency added to every proxied request; tool-call round trip,
16-thread throughput and proxied requests per tool call for rlmq's host client (one long-poll, results
on kept-alive connections) and, in the same run on the same sandbox, the seed's design
(``bench/seed_bridge_client.py``: a poll every 50 ms and each result on a new connection).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import command_line
from broker_bridge import interpreter_factory
from rlmq.demo import CORPUS
from rlmq.inputs import load_input_value


def round_trips(interp: Any, calls: int) -> list[float]:
    interp.tools["noop"] = lambda: None
    out = interp.execute(
        "import time\nnoop()\ntimes = []\n"
        f"for _ in range({calls}):\n"
        "    t = time.perf_counter()\n    noop()\n    times.append(time.perf_counter() - t)\n"
        "times"  # the last expression's value comes back whole (printed output is capped)
    )
    return out


def concurrent_throughput(interp: Any, threads: int, calls_per_thread: int) -> float:
    interp.tools["noop"] = lambda: None
    out = interp.execute(
        "import time\nfrom concurrent.futures import ThreadPoolExecutor\n"
        "def work(_):\n"
        f"    for _ in range({calls_per_thread}):\n        noop()\n"
        f"with ThreadPoolExecutor({threads}) as pool:\n"
        f"    list(pool.map(work, range({threads})))  # warm the connections\n"
        "    t = time.perf_counter()\n"
        f"    list(pool.map(work, range({threads})))\n"
        "print(time.perf_counter() - t)"
    )
    return threads * calls_per_thread / float(out)


def start_times(isolation: str, starts: int) -> list[float]:
    """Seconds from nothing to a sandbox whose runtime answers (what the first execute waits for)."""
    times = []
    for _ in range(starts):
        interp = interpreter_factory("local", isolation=isolation)()
        began = time.perf_counter()
        interp.start()
        times.append(time.perf_counter() - began)
        interp.shutdown()
    return sorted(times)


def measure(isolation: str, calls: int, starts: int) -> dict[str, float]:
    warm = interpreter_factory("local", isolation=isolation)()
    warm.start()  # the bwrap probe and the page cache, outside the timings
    warm.shutdown()
    starts_ms = [t * 1000 for t in start_times(isolation, starts)]
    interp = interpreter_factory("local", isolation=isolation)()
    try:
        times = sorted(t * 1000 for t in round_trips(interp, calls))
        throughput = concurrent_throughput(interp, threads=16, calls_per_thread=50)
    finally:
        interp.shutdown()
    return {
        "sandbox start, median (ms)": statistics.median(starts_ms),
        "sandbox start, max (ms)": starts_ms[-1],
        "no-op tool call round trip, median (ms)": statistics.median(times),
        "no-op tool call round trip, p95 (ms)": times[int(len(times) * 0.95)],
        "throughput, 16 sandbox threads (calls/s)": throughput,
    }


def bytes_over_iterations(iterations: int) -> tuple[int, int]:
    chapters = load_input_value(f"@{CORPUS}", split="chapters")
    interp = interpreter_factory("local")()
    try:
        for i in range(iterations):
            # What RLM does: the same inputs re-sent on every iteration, with a fresh code block.
            interp.execute(f"step_{i} = len(chapters)\nprint(step_{i}, chapters[{i % 117}][:60])", {"chapters": chapters})
        return interp.bytes_sent, CORPUS.stat().st_size
    finally:
        interp.shutdown()


PROXY_CALLS_PER_THREAD = 25  # x 16 threads: 400 calls per throughput figure
THROUGHPUT_REPEATS = 3


def proxied_requests(emulator: Any, interp: Any, calls: int) -> float:
    """Requests through the preview proxy per tool call: an execute of ``calls`` no-op calls less an
    execute of none (each execute's own outcome and wake-up)."""
    interp.tools["noop"] = lambda: None
    counts = []
    for n in (0, calls):
        emulator.reset_requests()
        interp.execute(f"for _ in range({n}):\n    noop()")
        counts.append(sum(v for k, v in emulator.requests().items() if k.startswith("preview ")))
    return (counts[1] - counts[0]) / calls


def measure_daytona(latencies_ms: list[float], calls: int) -> dict[tuple[float, str], dict[str, float]]:
    """Each design's figures at each preview-proxy latency, on one emulator sandbox."""
    from bench.seed_bridge_client import SeedBrokerClient
    from tests.support.daytona_emulator.harness import running_emulator

    results: dict[tuple[float, str], dict[str, float]] = {}
    with running_emulator() as emulator:
        os.environ.update(emulator.env())
        interp = interpreter_factory("daytona")()
        try:
            interp.start()
            assert interp._client is not None  # started
            designs: dict[str, Any] = {"rlmq": interp._client, "seed": SeedBrokerClient.like(interp._client)}
            for ms in latencies_ms:
                emulator.faults(latency={"preview": ms / 1000})
                for design, client in designs.items():
                    interp._client = client  # the host side of the bridge; sandbox and broker stay as they are
                    times = sorted(t * 1000 for t in round_trips(interp, calls))
                    throughputs, loaded_requests = [], []
                    for _ in range(THROUGHPUT_REPEATS):  # the median: this box is shared, single runs are noisy
                        emulator.reset_requests()
                        throughputs.append(concurrent_throughput(interp, threads=16,
                                                                 calls_per_thread=PROXY_CALLS_PER_THREAD))
                        proxied = sum(v for k, v in emulator.requests().items() if k.startswith("preview "))
                        loaded_requests.append(proxied / (2 * 16 * PROXY_CALLS_PER_THREAD))  # warm-up pass + timed
                    results[(ms, design)] = {
                        "round trip, median (ms)": statistics.median(times),
                        "round trip, p95 (ms)": times[int(len(times) * 0.95)],
                        "proxied requests per call": proxied_requests(emulator, interp, calls),
                        "throughput, 16 threads (calls/s)": statistics.median(throughputs),
                        "proxied requests per call, 16 threads": statistics.median(loaded_requests),
                    }
                emulator.clear_faults()
            interp._client = designs["rlmq"]
        finally:
            interp.shutdown()
    return results


def print_daytona(results: dict[tuple[float, str], dict[str, float]]) -> None:
    columns = list(results)
    print(f"{'preview-proxy latency (ms)':<40}" + "".join(f"{f'{ms:g} {design}':>12}" for ms, design in columns))
    for metric in results[columns[0]]:
        digits = 0 if "calls/s" in metric else 1 if "ms" in metric else 2
        print(f"{metric:<40}" + "".join(f"{results[c][metric]:>12.{digits}f}" for c in columns))


def main() -> None:
    args = command_line(__doc__, calls=500, iterations=40, starts=10, backend=("local", "local or daytona"),
                        latencies=("0,20,80", "daytona: preview-proxy latencies in ms"),
                        proxy_calls=(100, "daytona: sequential tool calls per design and latency"))
    if args.backend == "daytona":
        print_daytona(measure_daytona([float(x) for x in args.latencies.split(",")], args.proxy_calls))
        return
    if args.backend != "local":
        raise SystemExit(f"bench/bridge.py: --backend must be local or daytona, not {args.backend!r}")

    modes = ("process", "namespaces")
    results = {mode: measure(mode, args.calls, args.starts) for mode in modes}
    sent, corpus = bytes_over_iterations(args.iterations)

    print(f"{'metric':<46}{'process':>12}{'namespaces':>12}")
    for metric in results[modes[0]]:
        digits = 0 if "calls/s" in metric else 2
        print(f"{metric:<46}" + "".join(f"{results[mode][metric]:>12.{digits}f}" for mode in modes))
    print(f"{f'bytes sent over {args.iterations} iterations':<46}{sent:>24,}")
    print(f"{'corpus size (bytes)':<46}{corpus:>24,}")
    print(f"{'bytes sent / corpus size':<46}{sent / corpus:>24.3f}")


if __name__ == "__main__":
    main()
