"""Benchmark: a fleet at scale. N concurrent runs on ONE rlm worker process against a rate-limited provider.

``--runs`` runs (default 200) are submitted at once to one ``rlm`` worker process (threads pool, one
slot per run unless ``--rlm-slots`` says otherwise), each with its own local (bubblewrap) sandbox and
a scripted root LM (``ScriptedRoot``, two steps: one ``llm_query_batched`` of ``--prompts`` prompts,
then ``SUBMIT``). Sub-calls go through ``--llm-workers`` llm workers x ``--llm-threads`` threads.
The stub LLM acts as ONE provider for the root and the sub-calls (one model): ``--rps`` requests/s
(OpenAI rate-limit headers, 429 + ``Retry-After`` beyond), ``--latency`` seconds per reply. Every
prompt is new (no cache hits); the fleet runs on default settings (it learns the limit from the headers).

Printed (one ``name: value`` line each, which ``tests/test_bench_scale.py`` parses):

- runs succeeded, wall time (first submit to last finish), runs/min, p50/p95 run latency (submit to
  the run's recorded end);
- provider utilisation: replies served (200) per second over the busy period, as % of R; the busy
  period is from the first to the last sub-call request the provider saw (the fan-outs' span; the
  first root calls and sandbox boots before it, and the last SUBMIT steps after it, are left out),
  and the 1-s windows in it (min, median); and over the seconds the provider was saturated (the
  fleet's limiter had held callers back within the second before a sample: more prompts waiting
  than R allows), what share of R was served (samples are ~1 s apart, fewer on a loaded box);
- throttled: the share of all requests answered 429;
- peak RSS of the rlm worker (its Celery process(es): the tree under it minus the sandboxes), per
  run (the peak / N) and what the runs added (peak - the idle worker's RSS, / N); the sandboxes'
  peak count and RSS;
- Redis memory peak (``used_memory_peak``, and the largest RSS sampled), its most connected clients
  and the commands it processed per provider request;
- the CPU seconds each part used while the runs ran (rlm worker, sandboxes, llm workers, Redis, this
  process with the stub);
- the load average before and after (the box is shared).

Run: ``python bench/scale.py`` from the repo root (``--runs 3 --prompts 4`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import psutil  # noqa: E402
import redis  # noqa: E402

from bench._common import command_line, every  # noqa: E402
from rlmq.client import Client  # noqa: E402
from rlmq.local_redis import start_private_redis  # noqa: E402
from rlmq.store import keys  # noqa: E402
from rlmq.store.records import RunRecord, RunStatus  # noqa: E402
from tests.support.fleet import Fleet  # noqa: E402
from tests.support.stub_llm import RLM_ACTION_MARKER, RequestRecord, ScriptedRoot, StubLLM, route  # noqa: E402
from workers.adaptive_limit import AdaptiveLimiter  # noqa: E402

SIGNATURE = "items: list[str] -> ok: int"
STEPS = [
    "answers = llm_query_batched(['Reply OK to item: ' + item for item in items])\nprint(answers.count('OK'))",
    "SUBMIT(ok=answers.count('OK'))",
]
MODEL = "openai/provider"  # root and sub-calls: one model, one provider limit


def sub_answer(prompt: str) -> str:
    return "OK" if "Reply OK" in prompt else "?"


class FleetSampler:
    """Peaks, over the samples taken, of the rlm worker's own processes (the tree under its Celery
    process, sandboxes left out: each sandbox process runs in a session of its own), of the sandboxes,
    and of Redis; live sandboxes counted by their leases; and the CPU each part used (the last reading
    of each process seen, so a sandbox that ended keeps its share). RSS only (``memory_info``): cheap
    enough to sample hundreds of processes each second."""

    def __init__(self, worker_pid: int, redis_client: redis.Redis, others: dict[str, list[int]]) -> None:
        self.limiter = AdaptiveLimiter(redis_client, MODEL)
        self.held_back: list[float] = []  # time.monotonic() of the samples at which the limiter had held callers back
        self.root = psutil.Process(worker_pid)
        self.session = os.getsid(worker_pid)
        self.redis = redis_client
        self.others = {name: [psutil.Process(pid) for pid in pids] for name, pids in others.items()}
        self.worker_rss = self.sandbox_rss = self.sandboxes = self.sandbox_procs = self.redis_rss = 0
        self.redis_clients = 0
        self.cpu: dict[tuple[str, int], float] = {}  # (part, pid) -> CPU seconds at the last reading

    def worker_now(self) -> int:
        """The RSS of the worker's own processes now (bytes)."""
        return self._split()[0]

    def cpu_seconds(self) -> dict[str, float]:
        parts: dict[str, float] = {}
        for (part, _), seconds in self.cpu.items():
            parts[part] = parts.get(part, 0.0) + seconds
        return parts

    def _split(self) -> tuple[int, int, int]:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0, 0, 0
        worker = sandbox = count = 0
        for p in procs:
            try:
                with p.oneshot():
                    rss, session, times = p.memory_info().rss, os.getsid(p.pid), p.cpu_times()
            except (psutil.Error, OSError):
                continue
            part = "rlm worker" if session == self.session else "sandboxes"
            self.cpu[(part, p.pid)] = times.user + times.system
            if session == self.session:
                worker += rss
            else:
                sandbox += rss
                count += 1
        return worker, sandbox, count

    def sample(self) -> None:
        worker, sandbox, count = self._split()
        self.worker_rss = max(self.worker_rss, worker)
        self.sandbox_rss = max(self.sandbox_rss, sandbox)
        self.sandbox_procs = max(self.sandbox_procs, count)
        for part, procs in self.others.items():
            for p in procs:
                try:
                    times = p.cpu_times()
                except psutil.Error:
                    continue
                self.cpu[(part, p.pid)] = times.user + times.system
        try:  # the limiter marks `pressed` (Redis's clock, us) each time it tells a caller to wait
            pressed, (seconds, micros) = self.limiter.state().get("pressed"), self.redis.time()
            if pressed and seconds + micros / 1e6 - float(pressed) / 1e6 < 1.0:
                self.held_back.append(time.monotonic())
        except redis.RedisError:
            pass
        try:  # live sandboxes: their leases (what `rlmq stats` counts)
            self.sandboxes = max(self.sandboxes, self.redis.zcount(keys.leases_index_key(), time.time(), "+inf"))
            self.redis_rss = max(self.redis_rss, int(self.redis.info("memory")["used_memory_rss"]))
            self.redis_clients = max(self.redis_clients, int(self.redis.info("clients")["connected_clients"]))
        except redis.RedisError:  # a missed sample is a missed sample
            pass


@dataclass(frozen=True)
class ProviderLoad:
    busy: float  # seconds from the first to the last sub-call request
    served: int  # 200 replies in the busy period
    utilisation: float  # served / (R x busy)
    window_min: int  # 1-s windows in the busy period
    window_median: float
    throttled: int  # 429 replies, whole benchmark
    requests: int
    saturated: int  # 1-s windows in which the fleet's limiter held callers back (demand above R)
    saturated_served: int  # 200 replies in those windows


def provider_load(records: list[RequestRecord], rate: float, held_back: list[float]) -> ProviderLoad:
    subs = [r.at for r in records if RLM_ACTION_MARKER not in r.prompt]
    start, end = (min(subs), max(subs)) if subs else (0.0, 0.0)
    ok = sorted(r.at for r in records if r.status == 200 and start <= r.at <= end)
    busy = max(end - start, 1.0)  # a smoke run's fan-outs take less than a second
    windows = [sum(1 for t in ok if start + k <= t < start + k + 1) for k in range(int(busy))] or [len(ok)]
    served = sorted(r.at for r in records if r.status == 200)
    saturated = [sum(1 for t in served if at - 1.0 <= t < at) for at in held_back]  # the second before each sample
    return ProviderLoad(busy=end - start, served=len(ok), utilisation=len(ok) / (rate * busy),
                        window_min=min(windows), window_median=statistics.median(windows),
                        throttled=sum(r.status == 429 for r in records), requests=len(records),
                        saturated=len(saturated), saturated_served=sum(saturated))


def timeline(records: list[RequestRecord]) -> str:
    """Per second from the first request: root calls / sub-calls served, 429s (where the time went)."""
    if not records:
        return ""
    t0 = min(r.at for r in records)
    rows: dict[int, list[int]] = {}
    for r in records:
        row = rows.setdefault(int(r.at - t0), [0, 0, 0])
        row[2 if r.status == 429 else 0 if RLM_ACTION_MARKER in r.prompt else 1] += 1
    return " ".join(f"{k}:{'/'.join(map(str, rows.get(k, [0, 0, 0])))}" for k in range(max(rows) + 1))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def submit_all(client: Client, args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    ids, submitted = [], {}
    for n in range(args.runs):
        salt = uuid.uuid4().hex[:10]  # new prompts: no cache hits
        run_id = client.submit(SIGNATURE, {"items": [f"run {n} {salt} item {i}" for i in range(args.prompts)]},
                               max_iters=4, max_llm_calls=args.prompts + 10)
        ids.append(run_id)
        submitted[run_id] = time.time()
    return ids, submitted


def wait_all(client: Client, ids: list[str], deadline: float) -> list[RunRecord]:
    """Every run's record once it ended, or as it stands at the deadline (a run that never ends is reported)."""
    records = []
    for run_id in ids:
        try:
            records.append(client.wait(run_id, timeout=max(1.0, deadline - time.monotonic()), interval=1.0))
        except TimeoutError:
            records.append(client.status(run_id))
    return records


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per Redis command so far (INFO commandstats): where the commands per request go."""
    return {name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in client.info("commandstats").items()}


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__, argv, runs=200, prompts=50,
                        rps=(50.0, "the provider's limit R, requests/s (past ~50 the runs' CPU bounds a 2-core box)"),
                        latency=0.5, llm_workers=2, llm_threads=64, rlm_slots=(0, "0: one per run"),
                        timeout=(1200.0, "seconds to wait for the runs"),
                        timeline=(False, "print each second's root calls/sub-calls/429s at the provider"))
    slots = args.rlm_slots or args.runs
    load_before = os.getloadavg()
    with start_private_redis() as server, StubLLM(latency=args.latency) as stub:
        stub.set_responder(route(root=ScriptedRoot(STEPS), sub=sub_answer))
        stub.set_provider_limit(args.rps, headers="openai")
        env = {"RLMQ_LM": MODEL, "RLMQ_LM_API_BASE": stub.api_base}  # nothing else: the defaults
        with Fleet(server.url, env) as fleet:
            rlm = fleet.start("rlm", name="scale-rlm", concurrency=slots, pool="threads", wait=False)
            llms = [fleet.start("llm", name=f"scale-llm{i}", concurrency=args.llm_threads, wait=False)
                    for i in range(args.llm_workers)]
            fleet.wait_ready([rlm, *llms], timeout=300)
            client = Client(server.url)
            memory = FleetSampler(rlm.proc.pid, client.redis, {
                "llm workers": [w.proc.pid for w in llms], "redis": [server.process.pid], "bench + stub": [os.getpid()]})
            idle_rss = memory.worker_now()
            memory.sample()
            cpu_before = memory.cpu_seconds()
            commands_before = int(client.redis.info("stats")["total_commands_processed"])
            calls_before = command_calls(client.redis)
            with every(1.0, memory.sample):
                t0 = time.time()
                ids, submitted = submit_all(client, args)
                records = wait_all(client, ids, deadline=time.monotonic() + args.timeout)
                wall = max(r.finished_at or time.time() for r in records) - t0
            memory.sample()
            redis_peak = int(client.redis.info("memory")["used_memory_peak"])
            commands = int(client.redis.info("stats")["total_commands_processed"]) - commands_before
            calls = Counter(command_calls(client.redis))
            calls.subtract(calls_before)
            client.close()
        load = provider_load(stub.requests, args.rps, memory.held_back)
        if args.timeline:
            print("provider timeline (second:root/sub/429):", timeline(stub.requests))
    load_after = os.getloadavg()

    mib = 2**20
    succeeded = sum(r.status is RunStatus.SUCCEEDED for r in records)
    latencies = [(r.finished_at or 0.0) - submitted[r.spec.run_id] for r in records]
    failed = [f"{r.spec.run_id} {r.status.value}: {r.error}" for r in records if r.status is not RunStatus.SUCCEEDED]
    print(f"\n{args.runs} runs x {args.prompts} prompts; provider {args.rps:g} requests/s (OpenAI headers), "
          f"latency {args.latency * 1000:.0f} ms; 1 rlm worker (threads x {slots}), {args.llm_workers} llm "
          f"worker(s) x {args.llm_threads} threads; local sandboxes; {os.cpu_count()} cores")
    lines = [
        ("load average before", " ".join(f"{x:.2f}" for x in load_before)),
        ("runs succeeded", f"{succeeded}/{len(records)}"),
        ("wall s", f"{wall:.1f}"),
        ("runs/min", f"{60 * len(records) / wall:.1f}"),
        ("run latency p50 s", f"{percentile(latencies, 0.5):.1f}"),
        ("run latency p95 s", f"{percentile(latencies, 0.95):.1f}"),
        ("provider busy period s", f"{load.busy:.1f}"),
        ("provider served in busy period", f"{load.served}"),
        ("provider utilisation %", f"{100 * load.utilisation:.1f}"),
        ("provider 1-s windows min/median", f"{load.window_min}/{load.window_median:g}"),
        ("provider saturated seconds sampled", f"{load.saturated}"),
        ("provider utilisation when saturated %",
         f"{100 * load.saturated_served / max(1.0, args.rps * load.saturated):.1f}"),
        ("throttled %", f"{100 * load.throttled / max(1, load.requests):.2f} ({load.throttled} of {load.requests})"),
        ("rlm worker peak RSS MiB", f"{memory.worker_rss / mib:.0f}"),
        ("rlm worker idle RSS MiB", f"{idle_rss / mib:.0f}"),
        ("rlm worker peak RSS per run MiB", f"{memory.worker_rss / len(records) / mib:.2f}"),
        ("rlm worker added RSS per run MiB", f"{(memory.worker_rss - idle_rss) / len(records) / mib:.2f}"),
        ("sandboxes peak live", f"{memory.sandboxes} ({memory.sandbox_procs} processes)"),
        ("sandboxes peak RSS MiB", f"{memory.sandbox_rss / mib:.0f}"),
        ("redis used_memory_peak MiB", f"{redis_peak / mib:.1f}"),
        ("redis peak RSS MiB", f"{memory.redis_rss / mib:.1f}"),
        ("redis peak connected clients", f"{memory.redis_clients}"),
        ("redis commands per provider request", f"{commands / max(1, load.requests):.1f}"),
        ("redis top commands per provider request", ", ".join(
            f"{name} {count / max(1, load.requests):.1f}" for name, count in calls.most_common(6))),
        ("CPU s during the runs", ", ".join(f"{part} {seconds - cpu_before.get(part, 0.0):.1f}"
                                            for part, seconds in sorted(memory.cpu_seconds().items()))),
        ("load average after", " ".join(f"{x:.2f}" for x in load_after)),
    ]
    for name, value in lines:
        print(f"{name}: {value}")
    for line in failed[:10]:
        print(f"failed: {line}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
