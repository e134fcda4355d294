"""Benchmark: the same scripted tree of runs at max_depth 1, 2 and 3 on a small fleet.

Every run of the tree plays one step (``ScriptedTree`` with a single script): it fans out ``--fanout``
tasks with ``rlm_query_batched`` (child runs, each in its own local sandbox) where it is offered and
with ``llm_query_batched`` at max_depth 1, then SUBMITs the joined answers. At the deepest level
``rlm_query_batched`` answers as ``llm_query_batched``, so max_depth d is a tree of
1 + f + ... + f^(d-1) runs whose leaves make f sub-calls each. One rlm worker (``--rlm-concurrency``,
default 2: fewer slots than the tree has waiting parents, which waiting parents' help makes work) and
one llm worker of 16 threads, the stub LLM with ``--latency`` per reply, fresh questions (no cache hit),
after one unmeasured warm-up run.

Printed per depth: wall time from submit to the root's end, runs in the tree, sandboxes used (distinct
sandbox ids in the records), the peak of live sandboxes (sampled every 50 ms), and the LM calls the stub
served (root steps + sub-calls), which must equal the tree's reported usage.

Run: ``python bench/recursion.py`` from the repo root. The machine is shared: run it 2-3 times, read ranges.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from bench._common import Column, command_line, every, print_table  # noqa: E402
from rlmq.client import Client  # noqa: E402
from rlmq.local_redis import start_private_redis  # noqa: E402
from rlmq.store.records import RunStatus  # noqa: E402
from tests.support.fleet import Fleet  # noqa: E402
from tests.support.rlm_tree import ScriptedTree, tree_responder  # noqa: E402
from tests.support.stub_llm import StubLLM  # noqa: E402
from workers.sandbox_registry import LeaseRegistry  # noqa: E402

SIGNATURE = "question: str -> answer: str"
STEP = ('label = globals().get("task") or question\n'
        'fan = rlm_query_batched if "rlm_query_batched" in globals() else llm_query_batched\n'
        'SUBMIT(answer=",".join(fan([f"{label}/{i}" for i in range({fanout})])))')


@dataclass
class DepthResult:
    depth: int
    seconds: float
    runs: int
    sandboxes: int
    peak_live: int
    lm_calls: int
    reported_calls: int


def run_depth(client: Client, stub: StubLLM, depth: int, fanout: int) -> DepthResult:
    stub.reset_stats()
    live = LeaseRegistry(client.redis, 30)
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], len(live.live()))

    started = time.monotonic()
    root = client.submit(SIGNATURE, {"question": f"q-{uuid.uuid4().hex[:8]}"}, max_depth=depth, max_iters=3)
    with every(0.05, sample):
        record = client.wait(root, timeout=600, interval=0.05)
    seconds = time.monotonic() - started
    if record.status is not RunStatus.SUCCEEDED:
        raise SystemExit(f"depth {depth}: the root ended {record.status.value}: {record.error}")
    tree = client.tree(root)
    records = [node.record for node in tree.nodes()]
    sandboxes = {r.progress.sandbox.id for r in records if r.progress.sandbox}
    return DepthResult(depth, seconds, len(records), len(sandboxes), peak[0], stub.request_count,
                       tree.usage().total.calls)


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__, argv, depths=("1,2,3", "max_depth values"), fanout=(4, "tasks per run"),
                        latency=(0.05, "seconds per stub reply"), rlm_concurrency=(2, "slots of the one rlm worker"))
    depths = [int(d) for d in args.depths.split(",")]
    rows = []
    with start_private_redis() as server, StubLLM(latency=args.latency) as stub:
        stub.set_responder(tree_responder(ScriptedTree([STEP.replace("{fanout}", str(args.fanout))], [])))
        env = {"RLMQ_LM": "openai/scripted-root", "RLMQ_SUB_LM": "openai/stub-sub", "RLMQ_LM_API_BASE": stub.api_base,
               "OPENAI_API_KEY": "sk-bench", "RLMQ_RATE_LIMIT_RPS": "1000", "RLMQ_RATE_LIMIT_BURST": "1000"}
        with Fleet(server.url, env) as fleet:
            started = [fleet.start("rlm", name="rec-rlm", concurrency=args.rlm_concurrency, wait=False),
                       fleet.start("llm", name="rec-llm", concurrency=16, wait=False)]
            fleet.wait_ready(started, timeout=120)
            client = Client(server.url)
            run_depth(client, stub, 1, args.fanout)  # warm-up: a fresh worker's first run pays its imports
            rows = [run_depth(client, stub, depth, args.fanout) for depth in depths]
            client.close()
    print_table(f"\nfan-out {args.fanout}; one rlm worker x {args.rlm_concurrency}, one llm worker x 16; "
                f"stub latency {args.latency * 1000:.0f} ms", [
                    Column("max_depth", "9d", lambda r: r.depth),
                    Column("wall s", "7.1f", lambda r: r.seconds),
                    Column("runs", "5d", lambda r: r.runs),
                    Column("sandboxes", "9d", lambda r: r.sandboxes),
                    Column("peak live", "9d", lambda r: r.peak_live),
                    Column("LM calls", "8d", lambda r: r.lm_calls),
                    Column("reported", "8d", lambda r: r.reported_calls),
                ], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
