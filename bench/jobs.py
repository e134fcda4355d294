"""Benchmark: corpus jobs. A job of many tiny items through a real fleet, and a huge one accepted.

Part 1 (``--items``, default 10,000): a job of tiny items (``doc: str, question: str -> answer: str``,
one root step ``SUBMIT(answer=llm_query(...))``) on a private Redis, one rlm worker (``--rlm-slots``
threads of the default pool, local sandboxes), one llm worker (32 threads), the stub LLM at ``--latency``
(default 0 ms). Prints items/min (from submit to the job's end), time from ``submit_job`` to the
first result, the growth of the client's peak RSS while submitting (sampled every 0.1 s), and
Redis's peak ``used_memory`` (sampled every 0.5 s). With ``--cpu-split`` it also prints the CPU seconds per
item of each part: the rlm worker's own process, its sandboxes' kernels, brokers and bwrap processes, the llm
worker, Redis, and this process (the client and the stub LLM), sampled every 0.2 s.

Part 2 (``--accept``, default 1,000,000): a job of that many items submitted with no workers: how
long the client takes to stream them in, its peak RSS (bounded by a chunk, not the job), Redis's memory for the stored items, and how many runs were fed (``max_active``).

Run: ``python bench/jobs.py`` from the repo root (``--items 0`` or ``--accept 0`` skips a part).
The machine is shared: read ranges over 2-3 runs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import psutil  # noqa: E402
import redis  # noqa: E402

from bench._common import CPUSplit, command_line, every  # noqa: E402
from rlmq.client import Client  # noqa: E402
from rlmq.local_redis import start_private_redis  # noqa: E402
from rlmq.store.jobs import JobStatus, JobStore  # noqa: E402
from tests.support.fleet import Fleet  # noqa: E402
from tests.support.stub_llm import ScriptedRoot, StubLLM, route  # noqa: E402

SIGNATURE = "doc: str, question: str -> answer: str"
STEP = "SUBMIT(answer=llm_query(question + ' | ' + doc))"


def items(n: int, tag: str) -> Iterator[dict[str, str]]:
    return ({"doc": f"{tag} item {i}"} for i in range(n))


class Peaks:
    """Redis's used_memory and this process's RSS, the highest of the samples."""

    def __init__(self, client: redis.Redis) -> None:
        self.client, self.redis, self.me = client, 0, psutil.Process()
        self.rss_before = self.rss = self.me.memory_info().rss

    def sample(self) -> None:
        self.rss = max(self.rss, self.me.memory_info().rss)
        try:
            self.redis = max(self.redis, int(self.client.info("memory")["used_memory"]))
        except redis.RedisError:
            pass


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def run_job(server_url: str, redis_pid: int, args) -> None:
    with StubLLM(latency=args.latency) as stub:
        stub.set_responder(route(root=ScriptedRoot([STEP]), sub=lambda p: "seen " + p[-30:]))
        env = {"RLMQ_LM": "openai/gpt-4o-mini", "RLMQ_SUB_LM": "openai/gpt-4o-mini", "OPENAI_API_KEY": "sk-bench",
               "RLMQ_LM_API_BASE": stub.api_base, "RLMQ_RATE_LIMIT_RPS": "10000", "RLMQ_RATE_LIMIT_BURST": "10000"}
        with Fleet(server_url, env) as fleet:
            rlm = fleet.start("rlm", name="jobs-rlm", concurrency=args.rlm_slots, wait=False)
            llm = fleet.start("llm", name="jobs-llm", concurrency=32, wait=False)
            fleet.wait_ready([rlm, llm], timeout=180)
            client = Client(server_url)
            jobs = JobStore(client.redis)
            peak = Peaks(redis.Redis.from_url(server_url))
            cpu = CPUSplit({"rlm worker": rlm.proc.pid, "llm worker": llm.proc.pid, "Redis": redis_pid,
                            "bench + stub LLM": os.getpid()}, trees=("rlm worker",))
            with every(0.1, peak.sample), every(0.2 if args.cpu_split else 3600, cpu.sample):
                cpu.sample()
                t0 = time.perf_counter()
                job_id = client.submit_job(SIGNATURE, {"question": "What is it?"}, items(args.items, "bench"),
                                           max_active=args.max_active, max_iters=3, max_llm_calls=5)
                submitted = time.perf_counter() - t0
                client_peak = peak.rss - peak.rss_before
                first = None
                while True:
                    record = jobs.get(job_id)
                    assert record is not None
                    if first is None and record.first_result_at is not None:
                        first = record.first_result_at - record.spec.submitted_at
                    if record.status.finished:
                        break
                    time.sleep(0.5)
                wall = time.perf_counter() - t0
                cpu.sample()
            print(f"job of {args.items} tiny items, {args.rlm_slots} rlm slots (threads pool, local sandboxes), "
                  f"max_active {args.max_active}, stub latency {args.latency * 1000:.0f} ms, {os.cpu_count()} cores")
            print(f"  status {record.status.value}, counts {record.counts}")
            print(f"  items/min {60 * args.items / wall:.0f} (wall {wall:.1f} s; submit_job returned after "
                  f"{submitted:.2f} s)")
            print(f"  first result {first:.2f} s after submit" if first is not None else "  no result")
            print(f"  client peak RSS growth during submit {mib(client_peak)}; Redis peak used_memory "
                  f"{mib(peak.redis)}")
            if args.cpu_split:
                split = cpu.seconds()
                print("  CPU ms per item: " + ", ".join(f"{part} {1000 * seconds / args.items:.0f}"
                                                       for part, seconds in sorted(split.items(), key=lambda kv: -kv[1]))
                      + f"; total {1000 * sum(split.values()) / args.items:.0f} "
                      f"({cpu.processes('sandbox kernels')} kernels seen)")
            assert record.status is JobStatus.DONE, record


def accept_job(server_url: str, args) -> None:
    client = Client(server_url)
    r = redis.Redis.from_url(server_url)
    before = int(r.info("memory")["used_memory"])
    peak = Peaks(r)
    with every(0.1, peak.sample):
        t0 = time.perf_counter()
        job_id = client.submit_job(SIGNATURE, {"question": "What is it?"}, items(args.accept, "accept"),
                                   max_active=args.max_active)
        wall = time.perf_counter() - t0
    record = JobStore(client.redis).get(job_id)
    assert record is not None
    after = int(r.info("memory")["used_memory"])
    print(f"job of {args.accept} items accepted with no workers: {wall:.1f} s ({args.accept / wall:.0f} items/s)")
    print(f"  client RSS {mib(peak.rss_before)} before, peak {mib(peak.rss)} (+{mib(peak.rss - peak.rss_before)}); "
          f"Redis +{mib(after - before)} "
          f"({(after - before) / args.accept:.0f} B/item); status {record.status.value}, total {record.total}, "
          f"runs fed {record.cursor} (max_active {args.max_active})")
    assert record.total == args.accept and record.cursor == args.max_active


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__, argv, items=10_000, accept=1_000_000, rlm_slots=4, max_active=8, latency=0.0,
                        cpu_split=False)
    if args.accept:
        with start_private_redis() as server:
            accept_job(server.url, args)
    if args.items:
        with start_private_redis() as server:
            run_job(server.url, server.process.pid, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
