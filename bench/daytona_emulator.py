"""Daytona emulator benchmark: what tests pay per sandbox on this machine.

    python bench/daytona_emulator.py [--creates 10] [--boots 3] [--calls 200]

SDK create (until "started") and delete of a bare sandbox; rlmq's Daytona boot (create, Flask
check, upload, broker, health through the preview link, Python context) until the first execute can
run; a no-op execute; and a no-op tool call's round trip from sandbox code through the preview proxy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.daytona_emulator.harness import running_emulator


def row(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return f"{name:<44} {len(ms):>5} {statistics.median(ms):>10.1f} {p90:>10.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--creates", type=int, default=10)
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    from daytona import CreateSandboxFromSnapshotParams

    with running_emulator() as emulator:
        os.environ.update(emulator.env())
        from broker_bridge import interpreter_factory

        client = emulator.client()
        creates, deletes = [], []
        for _ in range(args.creates):
            began = time.perf_counter()
            sandbox = client.create(CreateSandboxFromSnapshotParams())
            creates.append(time.perf_counter() - began)
            began = time.perf_counter()
            sandbox.delete()
            deletes.append(time.perf_counter() - began)

        boots, executes, calls = [], [], []
        for _ in range(args.boots):
            interp = interpreter_factory("daytona")()
            began = time.perf_counter()
            interp.start()
            boots.append(time.perf_counter() - began)
            interp.tools["noop"] = lambda: None
            for _ in range(5):
                began = time.perf_counter()
                interp.execute("pass")
                executes.append(time.perf_counter() - began)
            calls += interp.execute(
                f"import time\nnoop()\nt = []\nfor _ in range({args.calls}):\n"
                "    s = time.perf_counter(); noop(); t.append(time.perf_counter() - s)\nt")
            interp.shutdown()

    print(f"{'Daytona emulator (ms)':<44} {'n':>5} {'median':>10} {'p90':>10}")
    print(row("SDK create until started", creates))
    print(row("SDK delete", deletes))
    print(row("rlmq boot until the first execute can run", boots))
    print(row("no-op execute", executes))
    print(row("no-op tool call through the preview proxy", calls))


if __name__ == "__main__":
    main()
