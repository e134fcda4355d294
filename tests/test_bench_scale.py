"""``bench/scale.py`` still runs: a tiny fleet-scale run (3 runs x 4 prompts) prints every number it
promises, each parsing, and every run succeeded. The numbers themselves are the benchmark's business.

The real benchmark's parts: its own private Redis, worker processes, local sandboxes and the stub LLM.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.support.fleet import REPO_ROOT

pytestmark = pytest.mark.slow  # ~15 s: three worker processes start

NUMBERS = [
    "wall s", "runs/min", "run latency p50 s", "run latency p95 s", "provider busy period s",
    "provider served in busy period", "provider utilisation %", "provider saturated seconds sampled",
    "provider utilisation when saturated %", "rlm worker peak RSS MiB",
    "rlm worker idle RSS MiB", "rlm worker peak RSS per run MiB", "rlm worker added RSS per run MiB",
    "sandboxes peak RSS MiB", "redis used_memory_peak MiB", "redis peak RSS MiB", "redis peak connected clients",
    "redis commands per provider request",
]


def test_a_tiny_scale_run_prints_every_number_and_every_run_succeeds() -> None:
    done = subprocess.run([sys.executable, "bench/scale.py", "--runs", "3", "--prompts", "4", "--rps", "50"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    lines = dict(re.findall(r"^([a-zA-Z][^:\n]*): (.+)$", out, re.MULTILINE))
    assert lines.get("runs succeeded") == "3/3", out
    for name in NUMBERS:
        assert name in lines, f"{name!r} missing from:\n{out}"
        float(lines[name])  # each is one number
    assert int(lines["provider served in busy period"]) >= 1
    throttled = re.fullmatch(r"([\d.]+) \((\d+) of (\d+)\)", lines["throttled %"])
    assert throttled and int(throttled[3]) >= 3 * (4 + 2), lines["throttled %"]  # 4 prompts + 2 root calls a run
    live = re.fullmatch(r"(\d+) \((\d+) processes\)", lines["sandboxes peak live"])
    assert live and 1 <= int(live[1]) <= 3, lines["sandboxes peak live"]
    cpu = dict(part.rsplit(" ", 1) for part in lines["CPU s during the runs"].split(", "))
    assert {"rlm worker", "sandboxes", "llm workers", "redis", "bench + stub"} <= set(cpu), cpu


def test_a_terminated_bench_leaves_no_process_behind() -> None:
    """SIGTERM (a `kill`, a CI timeout) mid-run stops the bench's fleet, Redis and sandboxes, as Ctrl-C does."""
    bench = subprocess.Popen([sys.executable, "bench/scale.py", "--runs", "3", "--prompts", "4", "--rps", "50"],
                             cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        me = psutil.Process(bench.pid)
        deadline = time.monotonic() + 120
        while not any("kernel.py" in " ".join(c.cmdline()) for c in _alive(me.children(recursive=True))):
            assert time.monotonic() < deadline and bench.poll() is None, "no run's sandbox started"
            time.sleep(0.2)
        started = me.children(recursive=True)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(60) != 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [" ".join(p.cmdline()[:4]) for p in _alive(alive)]
    finally:
        if bench.poll() is None:
            bench.kill()


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in processes:
        try:
            p.cmdline()
            out.append(p)
        except psutil.Error:
            pass
    return out
