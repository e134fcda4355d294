"""Sandbox bridge benchmark (local backend): tool-call latency, concurrent throughput, bytes sent.

    python bench/bridge.py [--calls 500] [--iterations 40]

Targets (issue 2): median no-op round trip under 3 ms; bytes sent over a 40-iteration run under
1.1 x the corpus size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker_bridge import interpreter_factory  # noqa: E402
from rlmq.demo import CORPUS  # noqa: E402
from rlmq.inputs import load_input_value  # noqa: E402



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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()

    interp = interpreter_factory("local")()
    try:
        times = sorted(t * 1000 for t in round_trips(interp, args.calls))
        throughput = concurrent_throughput(interp, threads=16, calls_per_thread=50)
    finally:
        interp.shutdown()
    sent, corpus = bytes_over_iterations(args.iterations)

    print(f"{'metric':<52}{'value':>14}")
    print(f"{'no-op tool call round trip, median (ms)':<52}{statistics.median(times):>14.2f}")
    print(f"{'no-op tool call round trip, p95 (ms)':<52}{times[int(len(times) * 0.95)]:>14.2f}")
    print(f"{'throughput, 16 sandbox threads (calls/s)':<52}{throughput:>14.0f}")
    print(f"{f'bytes sent over {args.iterations} iterations':<52}{sent:>14,}")
    print(f"{'corpus size (bytes)':<52}{corpus:>14,}")
    print(f"{'bytes sent / corpus size':<52}{sent / corpus:>14.3f}")


if __name__ == "__main__":
    main()
