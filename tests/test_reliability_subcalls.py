"""Sub-calls survive a dead llm worker: SIGKILL one of two llm workers mid-batch and every prompt
still gets its real answer, soon (its sub-tasks are sent again once the worker's heartbeat expires,
not after the broker's one-hour visibility timeout), and the step's own code timeout does not count
the time the step waits on the fleet.

Real Redis, real worker processes (one rlm, two llm), a local sandbox, the stub LLM over HTTP.
"""

from __future__ import annotations

import time

import pytest

from rlmq.store.records import RunStatus
from tests.support.fleet import Fleet, fleet_fixture
from tests.support.records import stored_result
from tests.support.reliability import WORKER_ENV, batch_step, sub_requests, submit, wait_status
from tests.support.stub_llm import StubLLM
from tests.support.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_stub")]


fleet = fleet_fixture(env=WORKER_ENV, workers=[("rlm", "rlm1", 1), ("llm", "llmA", 4), ("llm", "llmB", 4)],
                      timeout=180)


def test_killed_llm_worker_mid_batch_loses_no_prompt(fleet: Fleet, stub: StubLLM, r) -> None:
    stub.latency = 0.5  # 40 prompts on 8 threads: the batch takes several seconds
    # A 5-s code timeout per step: the batch (and the recovery from the kill) takes longer, but that
    # is time spent waiting on a host tool, which the step clock does not count.
    run_id, _ = submit(r, stub, ["print(items)", batch_step(40), "SUBMIT(answers=answers)"],
                       options={"execution_timeout": 5}, tag="llm-kill")
    wait_until(lambda: sub_requests(stub) >= 6, 60, "the batch under way")
    victim = next(w for w in fleet.workers if w.name.startswith("llmA"))
    fleet.kill(victim)
    killed_at = time.monotonic()

    record = wait_status(r, run_id, timeout=120)  # far below the defaults (300 s step, 1200 s gather)
    print(f"\nMEASURED kill llm worker: run succeeded {time.monotonic() - killed_at:.1f}s after the kill, "
          f"{record.progress.subtasks_resent} sub-task(s) resent")
    assert record.status is RunStatus.SUCCEEDED, (record.error, record.error_detail)
    answers = stored_result(r, run_id)["outputs"]["answers"]
    assert answers == [f"answer-{i}" for i in range(40)]  # no [ERROR], no timeout
    progress = record.progress
    assert progress.subtasks_resent >= 1 and progress.llm_errors == 0, progress
    fleet.workers.remove(victim)
