"""Runs survive their worker: SIGKILL of a whole rlm worker or of its prefork child restarts the run
on a live worker, which replays it through the Redis caches (the stub LLM sees no prompt twice);
queued runs never wait behind a busy worker; cancelled and failed runs end in real Celery states.

Real Redis, real worker processes (two rlm, one llm), local sandboxes, the stub LLM over HTTP.
Workers run with 3-s leases and 1-s maintenance (``FAST_FAULTS_ENV``).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult

from broker_bridge.backends.process_jail import pids_with_marker
from rlmq.client import Client
from rlmq.store.records import RunRecord, RunStatus, RunStore
from tests.support.fleet import Fleet, WorkerProcess, fleet_fixture, redis_url_of
from tests.support.net import http_get
from tests.support.records import stored_record, stored_result
from tests.support.reliability import (
    WORKER_ENV,
    batch_step,
    child_pids,
    kill,
    prompt_repeats,
    sub_requests,
    submit,
    wait_status,
)
from tests.support.stub_llm import StubLLM
from tests.support.wait import wait_until
from workers.sandbox_registry import LeaseRegistry

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_stub")]


# prefork: one of the faults is the SIGKILL of a run's prefork child (the threads pool has no children)
fleet = fleet_fixture(env=WORKER_ENV, workers=[("rlm", "rlm1", 1, "prefork"), ("rlm", "rlm2", 1, "prefork"),
                                               ("llm", "llmA", 8)], timeout=180)


@pytest.fixture(scope="module")
def flower(fleet: Fleet) -> str:
    return fleet.start_flower()


def flower_get(flower: str, path: str):
    status, body = http_get(flower + path, timeout=5)
    try:
        return json.loads(body) if status == 200 else None
    except ValueError:
        return None


def flower_state(flower: str, run_id: str) -> str | None:
    info = flower_get(flower, f"/api/task/info/{run_id}")
    return info.get("state") if isinstance(info, dict) else None


def rlm_worker(fleet: Fleet, hostname: str | None) -> WorkerProcess:
    return next(w for w in fleet.workers if w.name == hostname and w.alive)


def replace(fleet: Fleet, dead: WorkerProcess) -> None:
    """Start a worker in place of a killed one, for the tests after this one."""
    fleet.workers.remove(dead)
    fleet.start(dead.queue, name=dead.name.split("@")[0], concurrency=1, pool="prefork", wait=True)


def running_in_step(r, stub, run_id: str, subs: int):
    def ready():
        record = stored_record(r, run_id)
        return record if (record.status is RunStatus.RUNNING and record.progress.iteration == 2
                          and sub_requests(stub) >= subs) else None

    return wait_until(ready, 60, "run in its second step with its batch answered")


STEPS = ["print(items)", batch_step(12, then="import time\ntime.sleep(4)\nprint('slept')"),
         "SUBMIT(answers=answers)"]
ANSWERS = [f"answer-{i}" for i in range(12)]


@pytest.mark.parametrize("victim", ["whole worker", "prefork child"])
def test_run_resumes_on_a_live_worker_without_paying_twice(fleet: Fleet, stub: StubLLM, r, victim: str) -> None:
    run_id, script = submit(r, stub, STEPS, tag=f"resume-{victim.split()[0]}")
    record = running_in_step(r, stub, run_id, 12)
    holder = rlm_worker(fleet, record.worker)
    sandboxes = LeaseRegistry(r, 3).live()
    assert len(sandboxes) == 1
    killed_at = time.monotonic()
    if victim == "whole worker":
        fleet.kill(holder)  # SIGKILL to the main process and its prefork child at once
    else:
        children = child_pids(holder.proc.pid)
        assert children, "the prefork worker has no child"
        for pid in children:
            kill(pid)

    restarted = wait_until(lambda: stored_record(r, run_id).attempt == 2, 120, "attempt 2")
    restarted_after = time.monotonic() - killed_at
    done = wait_status(r, run_id, timeout=120)
    print(f"\nMEASURED kill {victim}: restarted after {restarted_after:.1f}s, "
          f"succeeded {time.monotonic() - killed_at:.1f}s after the kill")
    assert restarted and done.status is RunStatus.SUCCEEDED, (done.error, done.error_detail)
    assert done.attempt == 2 and done.restart_reason is not None, done.restarts
    assert "stopped heartbeating" in done.restart_reason, done.restarts
    assert stored_result(r, run_id)["outputs"]["answers"] == ANSWERS
    assert prompt_repeats(stub) == {}  # every root step and sub-call was paid once: the replay read the caches
    assert script.calls == [0, 1, 2]
    # The run's record is written before the task returns; Celery stores SUCCESS a moment later.
    wait_until(lambda: AsyncResult(run_id).state == "SUCCESS", 10, "Celery state SUCCESS")
    wait_until(lambda: not pids_with_marker(sandboxes[0]), 20, "the dead attempt's sandbox processes gone")
    assert LeaseRegistry(r, 3).live() == []
    if victim == "whole worker":
        replace(fleet, holder)
    else:
        assert holder.alive


def test_a_stalled_owner_cut_off_from_its_run_writes_nothing(fleet: Fleet, stub: StubLLM, r) -> None:
    run_id, _ = submit(r, stub, ["print(items)", batch_step(4, then="import time\ntime.sleep(5)"),
                                 "SUBMIT(answers=answers)"], tag="stalled")
    record = running_in_step(r, stub, run_id, 4)
    holder = rlm_worker(fleet, record.worker)
    os.killpg(holder.proc.pid, signal.SIGSTOP)  # alive but silent: a partition, a frozen VM
    try:
        done = wait_status(r, run_id, timeout=120)
    finally:
        os.killpg(holder.proc.pid, signal.SIGCONT)
    assert done.status is RunStatus.SUCCEEDED and done.attempt == 2 and done.worker != holder.name
    result = stored_result(r, run_id)
    wait_until(lambda: "lost its claim" in holder.log_tail(200), 30, "the old owner noticed it was fenced off")
    time.sleep(2.0)
    after = stored_record(r, run_id)
    assert (after.status, after.attempt, after.worker, after.finished_at) == (
        done.status, done.attempt, done.worker, done.finished_at)
    assert RunStore(r).result(run_id) == result and AsyncResult(run_id).state == "SUCCESS"
    assert holder.alive and LeaseRegistry(r, 3).live() == []


def test_queued_runs_start_on_an_idle_worker_and_cancel_is_revoked(fleet: Fleet, flower: str, stub: StubLLM,
                                                                   r) -> None:
    long_id, _ = submit(r, stub, ["import time\nfor _ in range(900):\n    time.sleep(0.1)", "SUBMIT(answers=[])"],
                        tag="long")
    def long_executing() -> RunRecord | None:
        record = stored_record(r, long_id)
        return record if record.progress.iteration == 1 else None

    long = wait_until(long_executing, 60, "long run executing its first step")
    quick = [submit(r, stub, ["SUBMIT(answers=['quick'])"], tag=f"quick{i}")[0] for i in range(2)]
    for run_id in quick:  # neither waits behind the busy worker (no prefetch into its buffer)
        record = wait_status(r, run_id, timeout=60)
        assert record.status is RunStatus.SUCCEEDED and record.worker != long.worker, (record.worker, long.worker)
    assert RunStore(r).status(long_id) is RunStatus.RUNNING

    sandboxes = LeaseRegistry(r, 3).live()
    Client(redis_url_of(r)).cancel(long_id)  # during sandbox execution
    assert wait_status(r, long_id, timeout=15).status is RunStatus.CANCELLED
    result = AsyncResult(long_id)
    wait_until(lambda: result.state == "REVOKED", 10, "Celery state REVOKED")
    assert isinstance(result.info, TaskRevokedError)  # readable, not a ValueError
    assert all(not pids_with_marker(s) for s in sandboxes) and LeaseRegistry(r, 3).live() == []
    try:
        wait_until(lambda: flower_state(flower, long_id) == "REVOKED", 15, "Flower shows REVOKED (not PROGRESS)")
    except AssertionError:
        raise AssertionError(flower_get(flower, f"/api/task/info/{long_id}")) from None
    # Flower reads the stored state without an error (it answered 500 for a plain-dict REVOKED)
    status, body = http_get(f"{flower}/api/task/result/{long_id}", timeout=5)
    assert status == 200, f"Flower /api/task/result answered {status}"
    assert json.loads(body)["state"] == "REVOKED"


def test_cancel_during_fan_out_revokes_the_batch(fleet: Fleet, flower: str, stub: StubLLM, r) -> None:
    stub.latency = 0.5
    run_id, _ = submit(r, stub, ["print(items)", batch_step(48), "SUBMIT(answers=answers)"], tag="cancel-fanout")
    wait_until(lambda: sub_requests(stub) >= 4, 60, "the batch under way")
    Client(redis_url_of(r)).cancel(run_id)
    assert wait_status(r, run_id, timeout=15).status is RunStatus.CANCELLED
    wait_until(lambda: AsyncResult(run_id).state == "REVOKED", 10, "Celery state REVOKED")
    wait_until(lambda: flower_state(flower, run_id) == "REVOKED", 15, "Flower shows REVOKED")
    seen = sub_requests(stub)
    wait_until(lambda: sub_requests(stub) == seen, 10, "no more sub-calls", interval=2.0)
    assert seen < 48, "the rest of the batch was revoked"
    assert LeaseRegistry(r, 3).live() == []


def test_failed_run_has_a_one_line_reason(fleet: Fleet, stub: StubLLM, r) -> None:
    run_id, _ = submit(r, stub, ["SUBMIT(answers=[])"], signature="items: list[str] -> -> nonsense", tag="bad")
    record = wait_status(r, run_id, timeout=60)
    assert record.status is RunStatus.FAILED and record.error is not None and record.error_detail
    assert "\n" not in record.error
    result = AsyncResult(run_id)
    wait_until(lambda: result.state == "FAILURE", 10, "Celery state FAILURE")
    assert "\n" not in str(result.info) and str(result.info) == record.error
