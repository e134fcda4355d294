"""Benchmark: ``llm_query_batched`` over N prompts, DSPy's built-in batch vs rlmq's fan-out.

Prints, side by side, the wall time of one batch of ``--prompts`` prompts (default 500) against
the stub LLM answering after ``--latency`` seconds (default 0.2):

  (a) DSPy 3.4.1's built-in ``llm_query_batched``: 8 threads in one process;
  (b) rlmq: one Celery group on queue ``llm``, served by ``--workers`` worker processes
      (default 2) x ``--threads`` threads (default 32);
  (c) the ideal N * latency / (workers * threads);

then the same rlmq batch again with a warm Redis response cache. ``--otel``: the same with tracing on
(``OTEL_EXPORTER_OTLP_ENDPOINT`` to an OTLP/HTTP receiver in a process of its own, whose CPU is shown
apart): the batch span here, a span per sub-task and per prompt on the llm workers. The fleet answers one untimed
warm-up batch of other prompts first, as a long-lived fleet would have. Everything is real: a private
Redis, ``celery -A tasks worker`` processes, HTTP to the stub through LiteLLM (rlmq) or
``dspy.LM`` (DSPy). Run: ``python bench/fanout.py`` from the repo root.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402

from bench._common import command_line  # noqa: E402
from rlmq.celery_config import point_at  # noqa: E402
from rlmq.local_redis import start_private_redis  # noqa: E402
from rlmq.settings import Settings  # noqa: E402
from tasks.app import app  # noqa: E402
from tests.support.fleet import Fleet  # noqa: E402
from tests.support.stub_llm import StubLLM  # noqa: E402


def dspy_builtin(stub: StubLLM, prompts: list[str]) -> float:
    sub = dspy.LM("openai/stub-sub", api_base=stub.api_base, api_key="stub", cache=False, num_retries=0)
    rlm = dspy.RLM("context -> answer", sub_lm=sub, max_llm_calls=len(prompts))
    tools = rlm._make_llm_tools()
    t0 = time.perf_counter()
    out = tools["llm_query_batched"](prompts)
    elapsed = time.perf_counter() - t0
    assert len(out) == len(prompts) and not any(o.startswith("[ERROR]") for o in out), out[:3]
    return elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rlmq_fanout(stub: StubLLM, redis_url: str, prompts: list[str], args: argparse.Namespace,
                cpu_pids: dict[str, list[int]]) -> tuple[float, float, dict[str, float]]:
    from workers.dspy_private import LLMCallBudget
    from workers.fanout import Fanout
    from workers.rlm import make_llm_tools

    settings = Settings(redis_url=redis_url, lm="openai/stub-root", sub_lm="openai/stub-sub",
                        lm_api_base=stub.api_base, fanout_width=args.workers * args.threads,
                        chunk_size=args.chunk_size)
    from workers.tracing import run_spans

    spans = run_spans(uuid.uuid4().hex, 1, "bench")  # the null object unless --otel set the endpoint

    def fanout() -> Fanout:
        f = Fanout(settings, app=app)
        f.spans = spans
        return f

    # Warm-up (not timed): long-lived workers have their connections, scripts and pools ready.
    fanout().query([f"warm-up {i}" for i in range(2 * args.workers * args.threads)])
    stub.reset_stats()
    times = []
    cpu: dict[str, float] = {}
    for _ in range(2):  # cold cache, then warm cache
        tools = make_llm_tools(fanout(), LLMCallBudget(len(prompts)))
        before = {name: sum(cpu_seconds(p) for p in pids) for name, pids in cpu_pids.items()}
        t0 = time.perf_counter()
        out = tools["llm_query_batched"](prompts)
        times.append(time.perf_counter() - t0)
        if not cpu:  # where the cold batch's CPU went: on a small box, CPU bounds (b)
            cpu = {name: sum(cpu_seconds(p) for p in pids) - before[name] for name, pids in cpu_pids.items()}
        assert len(out) == len(prompts) and not any(o.startswith("[ERROR]") for o in out), out[:3]
    spans.end("SUCCEEDED")
    return times[0], times[1], cpu


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__, argv, prompts=500, latency=0.2, workers=2, threads=32,
                        chunk_size=(8, "prompts per sub-task message"),
                        otel=(False, "trace: spans exported over OTLP/HTTP to a receiver process"))
    prompts = [f"bench prompt {i}: who is the richest?" for i in range(args.prompts)]

    with start_private_redis() as server:
        point_at(app, server.url)
        with StubLLM(latency=args.latency) as stub:
            print(f"stub latency {args.latency * 1000:.0f} ms, {args.prompts} prompts", flush=True)
            builtin = dspy_builtin(stub, prompts)
            sent_builtin = stub.request_count
            stub.reset_stats()
            env = {"RLMQ_LM": "openai/stub-sub", "RLMQ_LM_API_BASE": stub.api_base,
                   "RLMQ_RATE_LIMIT_RPS": "100000", "RLMQ_RATE_LIMIT_BURST": "100000"}
            receiver = None
            if args.otel:
                receiver_log = tempfile.NamedTemporaryFile("w+", prefix="rlmq-otlp-", suffix=".log")  # noqa: SIM115
                receiver = subprocess.Popen([sys.executable, "-m", "tests.support.otlp_receiver"], cwd=REPO,
                                            stdout=subprocess.PIPE, stderr=receiver_log, text=True)
                assert receiver.stdout is not None
                env["OTEL_EXPORTER_OTLP_ENDPOINT"] = os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = \
                    receiver.stdout.readline().strip()
            with Fleet(server.url, env) as fleet:
                workers = [fleet.start("llm", name=f"bench{i}", concurrency=args.threads, wait=False)
                           for i in range(args.workers)]
                fleet.wait_ready(workers, timeout=120)
                cpu_pids = {"this process (client + stub LLM)": [os.getpid()],
                            "llm workers": [w.proc.pid for w in workers], "redis": [server.process.pid]}
                receiver_pids = {"OTLP receiver (not counted)": [receiver.pid]} if receiver else {}
                cold, warm, cpu = rlmq_fanout(stub, server.url, prompts, args, {**cpu_pids, **receiver_pids})
                time.sleep(1)  # the workers' span exporters flush (200 ms schedule when tracing)
            if receiver is not None:
                time.sleep(1.5)  # the receiver's next count
                receiver.terminate()
                receiver.wait(10)
                receiver_log.seek(0)
                counts = receiver_log.read().split()
                print(f"spans received over OTLP: {counts[-2] if len(counts) >= 2 else 0}", flush=True)
            sent_fleet = stub.request_count

    slots = args.workers * args.threads
    ideal = args.prompts * args.latency / slots
    rows = [
        ("(a) DSPy built-in, 8 threads, 1 process", builtin, sent_builtin),
        (f"(b) rlmq fan-out, {args.workers} llm workers x {args.threads} threads", cold, sent_fleet),
        (f"(c) ideal N*latency/{slots}", ideal, None),
        ("    rlmq rerun, warm Redis cache", warm, 0),
    ]
    print(f"\n{'':52s} {'wall s':>8s} {'requests':>9s}")
    for label, seconds, sent in rows:
        print(f"{label:52s} {seconds:8.2f} {'' if sent is None else sent:>9}")
    print(f"\nspeed-up (a)/(b): {builtin / cold:.1f}x   (b)/ideal: {cold / ideal:.2f}x   "
          f"warm/cold: {warm / cold:.3f}")
    apart = {name: cpu.pop(name) for name in list(cpu) if "not counted" in name}
    total = sum(cpu.values())
    print(f"\nCPU during (b): {total:.2f} s = {total * 1000 / args.prompts:.1f} ms per prompt "
          f"over {os.cpu_count()} cores ({total / (os.cpu_count() or 1):.2f} s of wall at the least)")
    for name, seconds in {**cpu, **apart}.items():
        print(f"    {name:40s} {seconds:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
