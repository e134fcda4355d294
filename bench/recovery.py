"""Benchmark: time to recovery after a worker dies, with the production defaults.

Starts a private Redis, the stub LLM, two ``rlm`` workers and two ``llm`` workers with the default
lease, maintenance and heartbeat settings (override with ``--lease``, ``--interval``,
``--heartbeat``), then:

  1. SIGKILLs the rlm worker that holds a run mid-batch and prints how long until the run was
     restarted (attempt 2) and until it succeeded on the other worker;
  2. SIGKILLs one llm worker mid-batch and prints how long until the batch's run succeeded and how
     many sub-tasks were sent again.

It also prints how many prompts the stub was sent twice (0 expected for the rlm kill).
Run: ``python bench/recovery.py`` from the repo root (about two minutes with the defaults).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import redis  # noqa: E402

from rlmq.local_redis import start_private_redis  # noqa: E402
from rlmq.store.records import RunRecord, RunStore  # noqa: E402
from tests.support.fleet import Fleet, configure_app  # noqa: E402
from tests.support.reliability import (  # noqa: E402
    batch_step,
    prompt_repeats,
    sub_requests,
    submit,
    wait_status,
)
from tests.support.stub_llm import StubLLM  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lease", type=float, default=None, help="RLMQ_LEASE_TTL (default: rlmq's, 30)")
    parser.add_argument("--interval", type=float, default=None, help="RLMQ_MAINTENANCE_INTERVAL (default 5)")
    parser.add_argument("--heartbeat", type=float, default=None, help="RLMQ_WORKER_HEARTBEAT_TTL (default 10)")
    args = parser.parse_args()
    env_overrides = {k: str(v) for k, v in (("RLMQ_LEASE_TTL", args.lease), ("RLMQ_MAINTENANCE_INTERVAL", args.interval),
                                             ("RLMQ_WORKER_HEARTBEAT_TTL", args.heartbeat)) if v is not None}
    with start_private_redis() as server, StubLLM(latency=0.3) as stub:
        configure_app(server.url)
        env = {"RLMQ_LM": "openai/scripted-root", "RLMQ_SUB_LM": "openai/stub-sub",
               "RLMQ_LM_API_BASE": stub.api_base, "RLMQ_RATE_LIMIT_RPS": "1000", "RLMQ_RATE_LIMIT_BURST": "1000",
               **env_overrides}
        with Fleet(server.url, env) as fleet:
            workers = [fleet.start("rlm", name=f"rlm{i}", concurrency=1, wait=False) for i in (1, 2)]
            workers += [fleet.start("llm", name=f"llm{i}", concurrency=4, wait=False) for i in (1, 2)]
            fleet.wait_ready(workers, timeout=300)
            r = redis.Redis.from_url(server.url)
            rows = [("rlm worker SIGKILL", *kill_rlm(fleet, stub, r)), ("llm worker SIGKILL", *kill_llm(fleet, stub, r))]
    print(f"{'fault':<20} {'restarted/resent':>18} {'succeeded after':>16} {'prompts paid twice':>19}")
    for name, first, done, twice in rows:
        print(f"{name:<20} {first:>18} {done:>15.1f}s {twice:>19}")
    return 0


def stored(r: redis.Redis, run_id: str) -> RunRecord:
    record = RunStore(r).get(run_id)
    assert record is not None, f"run {run_id} has no record"
    return record


def kill_rlm(fleet: Fleet, stub: StubLLM, r: redis.Redis) -> tuple[str, float, int]:
    stub.reset_stats()
    run_id, _ = submit(r, stub, ["print(items)", batch_step(16, then="import time\ntime.sleep(3)"),
                                 "SUBMIT(answers=answers)"], tag="bench-rlm")
    wait_until(lambda: stored(r, run_id).progress.iteration == 2 and sub_requests(stub) >= 16, 120,
               "batch answered")
    holder = next(w for w in fleet.workers if w.name == stored(r, run_id).worker)
    fleet.kill(holder)
    t0 = time.monotonic()
    wait_until(lambda: stored(r, run_id).attempt == 2, 300, "attempt 2")
    restarted = time.monotonic() - t0
    record = wait_status(r, run_id, timeout=300)
    assert record.status.value == "SUCCEEDED", record.error
    return f"{restarted:.1f}s", time.monotonic() - t0, len(prompt_repeats(stub))


def kill_llm(fleet: Fleet, stub: StubLLM, r: redis.Redis) -> tuple[str, float, int]:
    stub.reset_stats()
    run_id, _ = submit(r, stub, ["print(items)", batch_step(40), "SUBMIT(answers=answers)"], tag="bench-llm")
    wait_until(lambda: sub_requests(stub) >= 6, 120, "batch under way")
    fleet.kill(next(w for w in fleet.workers if w.queue == "llm" and w.alive))
    t0 = time.monotonic()
    record = wait_status(r, run_id, timeout=300)
    assert record.status.value == "SUCCEEDED", record.error
    return f"{record.progress.subtasks_resent} sub-task(s)", time.monotonic() - t0, len(prompt_repeats(stub))


if __name__ == "__main__":
    sys.exit(main())
