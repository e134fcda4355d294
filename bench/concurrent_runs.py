"""Benchmark: many runs at once. 32 concurrent RLM runs of 100 documents each on the local stack.

Each run is a real ``run_rlm``: a local sandbox, a scripted root LM (``ScriptedRoot``, three
steps: look, ``llm_query_batched`` over the 100 documents, ``SUBMIT``), its sub-calls through
one ``llm`` worker (32 threads), all against the stub LLM (``--latency`` per reply). The ``rlm``
worker's pool is what varies: ``--pools`` lists ``prefork:2,prefork:4,threads:8,...``. For each
pool the 32 runs are submitted at once (fresh documents: no cache hits) and the script prints:

- runs per minute (32 / wall time from the first submit to the last finish);
- peak memory of the rlm worker's processes (the Celery parent and its pool children; RSS and
  PSS, which shares copy-on-write pages fairly), per rlm slot (divided by the concurrency), and
  of the sandboxes' processes (a local sandbox is two: its kernel and its broker, each in its
  own session) per process;
- the CPU the rlm worker used per run.

Run: ``python bench/concurrent_runs.py`` from the repo root. The machine is shared: run it 2-3
times and read ranges.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import psutil  # noqa: E402

from bench._common import Column, command_line, every, print_table  # noqa: E402
from rlmq.client import Client  # noqa: E402
from rlmq.local_redis import start_private_redis  # noqa: E402
from rlmq.store.records import RunStatus  # noqa: E402
from tests.support.fleet import Fleet  # noqa: E402
from tests.support.stub_llm import ScriptedRoot, StubLLM, route  # noqa: E402

SIGNATURE = "docs: list[str] -> tally: int"
STEPS = [
    "print(len(docs), docs[0][:40])",
    "answers = llm_query_batched(['Is this document about shipping? YES or NO.\\n\\n' + d for d in docs])\n"
    "print(answers.count('YES'))",
    "SUBMIT(tally=answers.count('YES'))",
]


def sub_answer(prompt: str) -> str:
    return "YES" if "shipping" in prompt.split("\n\n", 1)[-1] else "NO"


class MemoryPeaks:
    """Peak RSS/PSS of a worker's Celery processes and of its sandboxes, over the samples taken."""

    def __init__(self, root_pid: int) -> None:
        self.root = psutil.Process(root_pid)
        self.peak_worker_rss = self.peak_worker_pss = 0
        self.peak_sandbox_rss_each = 0.0
        self.peak_sandboxes = 0

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        worker_rss = worker_pss = sandbox_rss = 0
        sessions = set()  # each sandbox (kernel + broker) runs in its own session
        for p in procs:
            try:
                is_worker = "celery" in " ".join(p.cmdline())
                info = p.memory_full_info()
                session = os.getsid(p.pid)
            except (psutil.Error, OSError):
                continue
            if is_worker:
                worker_rss += info.rss
                worker_pss += getattr(info, "pss", info.rss)
            else:
                sandbox_rss += info.rss
                sessions.add(session)
        sandboxes = len(sessions)  # processes: each has its own session
        self.peak_worker_rss = max(self.peak_worker_rss, worker_rss)
        self.peak_worker_pss = max(self.peak_worker_pss, worker_pss)
        if sandboxes:
            self.peak_sandboxes = max(self.peak_sandboxes, sandboxes)
            self.peak_sandbox_rss_each = max(self.peak_sandbox_rss_each, sandbox_rss / sandboxes)


@dataclass(frozen=True)
class PoolResult:
    pool: str
    wall: float
    runs_per_min: float
    failed: int
    rss_slot: float  # MiB per rlm slot
    pss_slot: float
    rss_total: float  # MiB, the whole rlm worker
    sandbox_rss: float  # MiB per sandbox process
    sandboxes: int
    cpu_per_run: float


COLUMNS: list[Column[PoolResult]] = [
    Column("rlm pool", "14s", lambda r: r.pool),
    Column("wall s", "7.1f", lambda r: r.wall),
    Column("runs/min", "9.1f", lambda r: r.runs_per_min),
    Column("MiB RSS/slot", "13.0f", lambda r: r.rss_slot),
    Column("MiB PSS/slot", "13.0f", lambda r: r.pss_slot),
    Column("MiB worker", "11.0f", lambda r: r.rss_total),
    Column("MiB/sbx proc", "13.0f", lambda r: r.sandbox_rss),
    Column("sbx procs", "10d", lambda r: r.sandboxes),
    Column("CPU s/run", "10.2f", lambda r: r.cpu_per_run),
    Column("failed", "7d", lambda r: r.failed),
]


def run_pool(server_url: str, stub: StubLLM, pool: str, concurrency: int, args: argparse.Namespace) -> PoolResult:
    env = {"RLMQ_LM": "openai/scripted-root", "RLMQ_SUB_LM": "openai/stub-sub", "RLMQ_LM_API_BASE": stub.api_base}
    with Fleet(server_url, env) as fleet:
        rlm = fleet.start("rlm", name=f"cr-{pool}{concurrency}", concurrency=concurrency, pool=pool, wait=False)
        llm = fleet.start("llm", name=f"cr-llm-{pool}{concurrency}", concurrency=32, wait=False)
        fleet.wait_ready([rlm, llm], timeout=180)
        client = Client(server_url)
        warm = [client.submit(SIGNATURE, {"docs": docs(5)}, max_iters=6) for _ in range(concurrency)]
        for run_id in warm:  # untimed: each slot imports, connects, starts its first sandbox
            client.wait(run_id, timeout=600)
        worker = psutil.Process(rlm.proc.pid)
        cpu0 = _cpu(worker)
        memory = MemoryPeaks(rlm.proc.pid)
        with every(0.1, memory.sample):
            t0 = time.perf_counter()
            ids = [client.submit(SIGNATURE, {"docs": docs(args.docs)}, max_iters=6, max_llm_calls=args.docs + 10)
                   for _ in range(args.runs)]
            records = [client.wait(run_id, timeout=1200) for run_id in ids]
            wall = time.perf_counter() - t0
        cpu = _cpu(worker) - cpu0
    failed = [r for r in records if r.status is not RunStatus.SUCCEEDED]
    return PoolResult(pool=f"{pool} -c {concurrency}", wall=wall, runs_per_min=60 * len(ids) / wall, failed=len(failed),
                      rss_slot=memory.peak_worker_rss / concurrency / 2**20,
                      pss_slot=memory.peak_worker_pss / concurrency / 2**20, rss_total=memory.peak_worker_rss / 2**20,
                      sandbox_rss=memory.peak_sandbox_rss_each / 2**20, sandboxes=memory.peak_sandboxes,
                      cpu_per_run=cpu / len(ids))


def _cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def docs(n: int) -> list[str]:
    salt = uuid.uuid4().hex[:8]
    return [f"Doc {i} {salt}: " + ("shipping manifest" if i % 3 == 0 else "weather report") for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__, argv, runs=32, docs=100, latency=0.1,
                        pools="prefork:2,prefork:4,prefork:8,threads:8,threads:16,threads:32")
    pools = [(p.split(":")[0], int(p.split(":")[1])) for p in args.pools.split(",")]
    rows: list[PoolResult] = []
    with start_private_redis() as server, StubLLM(latency=args.latency) as stub:
        stub.set_responder(route(root=ScriptedRoot(STEPS), sub=sub_answer))
        for pool, concurrency in pools:
            rows.append(run_pool(server.url, stub, pool, concurrency, args))
            print(f"  {rows[-1].pool}: {rows[-1].wall:.1f}s", flush=True)
    print_table(f"\n{args.runs} concurrent runs x {args.docs} documents; stub latency {args.latency * 1000:.0f} ms; "
                f"1 llm worker x 32 threads; {os.cpu_count()} cores", COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
