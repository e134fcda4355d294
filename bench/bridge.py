"""Sandbox bridge benchmark (local backend): start time, tool-call latency, throughput, bytes sent.

    python bench/bridge.py [--calls 500] [--iterations 40] [--starts 10]

Each latency figure is measured in both local isolation modes: "process" (plain subprocesses, a
loopback port) and "namespaces" (bubblewrap, a Unix socket). Targets: median no-op round trip under
3 ms (issue 2); sandbox start under 300 ms (issue 7); bytes sent over a 40-iteration run under 1.1 x
the corpus size.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import command_line
from broker_bridge import interpreter_factory
from rlmq.demo import CORPUS
from rlmq.inputs import load_input_value


def round_trips(interp, calls: int) -> list[float]:
    interp.tools["noop"] = lambda: None
    out = interp.execute(
        "import time\nnoop()\ntimes = []\n"
        f"for _ in range({calls}):\n"
        "    t = time.perf_counter()\n    noop()\n    times.append(time.perf_counter() - t)\n"
        "times"  # the last expression's value comes back whole (printed output is capped)
    )
    return out


def concurrent_throughput(interp, threads: int, calls_per_thread: int) -> float:
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


def main() -> None:
    args = command_line(__doc__, calls=500, iterations=40, starts=10)

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
