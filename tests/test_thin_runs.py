"""Thin runs: an rlm worker process holds many runs at once in a threads pool (the default of `rlmq up`,
`rlmq worker` and compose). What prefork gave for free must still hold: runs in one process stay
separate (models, budgets, usage), the engine enforces the workers' wall-clock limit itself (Celery's
time limits need a process pool), and a SIGKILL of the process resumes every run it held elsewhere.

Real Redis, real worker processes (threads pools), local sandboxes, the stub LLM.
"""

from __future__ import annotations

import time

import pytest

from broker_bridge.backends.process_jail import pids_with_marker
from rlmq.store.records import RunSandbox, RunStatus, RunStore
from tests.support.fleet import Fleet, fleet_fixture
from tests.support.records import stored_result
from tests.support.reliability import WORKER_ENV, batch_step, prompt_repeats, submit, wait_status
from tests.support.stub_llm import StubLLM
from tests.support.wait import wait_until
from workers.sandbox_registry import LeaseRegistry

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_stub")]

RUN_TIME_LIMIT = 15
ENV = {**WORKER_ENV, "RLMQ_ALLOWED_MODELS": "openai/*", "RLMQ_RUN_TIME_LIMIT": str(RUN_TIME_LIMIT)}
fleet = fleet_fixture(env=ENV, workers=[("rlm", "thin1", 8, "threads"), ("llm", "thinA", 16)], timeout=180)


def test_two_runs_in_one_process_keep_their_models_budgets_and_usage(fleet: Fleet, stub: StubLLM, r) -> None:
    steps = [batch_step(4, then="import time\ntime.sleep(2)"),
             "more = llm_query_batched([f'question {i} again ' + items[0] for i in range(4)])\nprint(more)",
             "SUBMIT(answers=answers)"]
    run_a, script_a = submit(r, stub, steps, tag="isoA",
                             options={"lm": "openai/iso-a", "sub_lm": "openai/iso-a-sub", "max_llm_calls": 4})
    run_b, script_b = submit(r, stub, steps, tag="isoB",
                             options={"lm": "openai/iso-b", "sub_lm": "openai/iso-b-sub", "max_llm_calls": 100})
    done_a, done_b = wait_status(r, run_a), wait_status(r, run_b)
    assert (done_a.status, done_b.status) == (RunStatus.SUCCEEDED, RunStatus.SUCCEEDED), (done_a.error, done_b.error)
    assert done_a.worker == done_b.worker, "the two runs were not in one process"

    def requests(model: str) -> list:
        return [req for req in stub.requests if req.model == model and req.status == 200]

    # Each run's root steps went to its own model, with its own input, and overlapped the other's.
    roots_a, roots_b = requests("iso-a"), requests("iso-b")
    assert len(roots_a) == len(steps) and len(roots_b) == len(steps), (len(roots_a), len(roots_b))
    assert all("item-isoA" in req.prompt for req in roots_a) and all("item-isoB" in req.prompt for req in roots_b)
    assert roots_a[0].at < roots_b[-1].at and roots_b[0].at < roots_a[-1].at, "the runs did not overlap"
    # Run A's budget (4 sub-calls) refused its second batch; run B's (100) did not.
    subs_a, subs_b = requests("iso-a-sub"), requests("iso-b-sub")
    assert len(subs_a) == 4 and len(subs_b) == 8, (len(subs_a), len(subs_b))
    assert all("item-isoA" in req.prompt for req in subs_a) and all("item-isoB" in req.prompt for req in subs_b)
    # Each run's usage counts its own calls only.
    usage_a, usage_b = stored_result(r, run_a)["usage"], stored_result(r, run_b)["usage"]
    assert (usage_a["sub"]["calls"], usage_b["sub"]["calls"]) == (4, 8), (usage_a, usage_b)
    assert (usage_a["root"]["calls"], usage_b["root"]["calls"]) == (len(steps), len(steps))
    assert script_a.calls == script_b.calls == [0, 1, 2]


def test_the_engine_stops_a_run_at_the_workers_time_limit(fleet: Fleet, stub: StubLLM, r) -> None:
    run_id, _ = submit(r, stub, ["print(items)", "import time\ntime.sleep(45)\nprint('too late')",
                                 "SUBMIT(answers=[])"], tag="overtime")
    def its_sandbox() -> RunSandbox | None:
        record = RunStore(r).get(run_id)
        return record.progress.sandbox if record is not None else None

    sandbox = wait_until(its_sandbox, 60, "the run's sandbox")
    started = time.monotonic()
    done = wait_status(r, run_id, timeout=60)
    print(f"\nMEASURED worker time limit {RUN_TIME_LIMIT}s: the run ended {time.monotonic() - started:.1f}s "
          f"after its sandbox started")
    assert done.status is RunStatus.STOPPED, (done.status, done.error)
    assert done.error is not None and "RLMQ_RUN_TIME_LIMIT" in done.error and "time limit" in done.error, done.error
    assert "too late" not in str(done.progress), "the sleeping step ran to its end"
    wait_until(lambda: LeaseRegistry(r, 3).live() == [], 20, "the sandbox's lease released")
    wait_until(lambda: not pids_with_marker(sandbox.id), 20, "the sandbox's processes gone")


def test_sigkill_of_a_threads_worker_resumes_every_run_it_held(fleet: Fleet, stub: StubLLM, r) -> None:
    steps = ["print(items)", batch_step(4, then="import time\ntime.sleep(3)\nprint('slept')"),
             "SUBMIT(answers=answers)"]
    runs = [submit(r, stub, steps, tag=f"held{i}") for i in range(4)]
    store = RunStore(r)
    holder = next(w for w in fleet.workers if w.queue == "rlm")

    def all_sleeping_in_their_second_step() -> bool:
        """Each run's batch answered: its step is in its sleep (a root call in flight would die with the
        worker and be paid again, as the one in-flight call of a dead worker always is)."""
        records = [store.get(run_id) for run_id, _ in runs]
        answered = [sum(1 for req in stub.requests if f"about item-held{i}" in req.prompt and req.status == 200)
                    for i in range(len(runs))]
        return all(rec is not None and rec.status is RunStatus.RUNNING and rec.worker == holder.name
                   and rec.progress.iteration >= 2 for rec in records) and min(answered) >= 4

    wait_until(all_sleeping_in_their_second_step, 90, "4 runs in their second step on one worker", interval=0.05)
    killed_at = time.monotonic()
    fleet.kill(holder)  # within their 3-s step; the runs resume on a worker started after the kill
    fleet.start("rlm", name="thin2", concurrency=8, pool="threads", wait=False)
    records = [wait_status(r, run_id, timeout=120) for run_id, _ in runs]
    print(f"\nMEASURED SIGKILL of a threads worker with 4 runs: all done {time.monotonic() - killed_at:.1f}s later")
    assert [rec.status for rec in records] == [RunStatus.SUCCEEDED] * 4, [rec.error for rec in records]
    assert all(rec.attempt == 2 and rec.worker != holder.name for rec in records), [rec.worker for rec in records]
    for run_id, script in runs:
        assert stored_result(r, run_id)["outputs"]["answers"] == [f"answer-{i}" for i in range(4)]
        assert script.calls == [0, 1, 2]
    assert prompt_repeats(stub) == {}
    wait_until(lambda: LeaseRegistry(r, 3).live() == [], 30, "every sandbox lease released")
