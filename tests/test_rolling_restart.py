"""A rolling restart: every worker of a working fleet is stopped the way an orchestrator stops it
(SIGTERM to the worker's main process: Celery's warm shutdown) and started again, one at a time, while
20 runs work. An rlm worker hands its runs back instead of waiting for them (``workers.drain``); each
resumes on another worker by replay. Every run succeeds once, nothing is paid twice, no sandbox is left.

Real Redis, real worker processes (two rlm of two slots, one llm), local sandboxes, the stub LLM.
"""

from __future__ import annotations

import signal
import time
from functools import partial

import pytest
from celery.result import AsyncResult

from rlmq.store.records import RunStatus, RunStore
from tests.support.fleet import Fleet, WorkerProcess, fleet_fixture
from tests.support.records import stored_result
from tests.support.reliability import WORKER_ENV, batch_step, prompt_repeats, submit, wait_status
from tests.support.stub_llm import StubLLM
from tests.support.wait import wait_until
from workers.sandbox_registry import LeaseRegistry

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_stub")]

WORKERS = [("rlm", "roll1", 2), ("rlm", "roll2", 2), ("llm", "rollA", 8)]
fleet = fleet_fixture(env=WORKER_ENV, workers=WORKERS, timeout=180)

RUNS = 20
STEPS = ["print(items)",
         batch_step(4, then="import time\ntime.sleep(2)\nprint('slept')"),
         "import time\ntime.sleep(3)\nprint('slept again')",
         "SUBMIT(answers=answers)"]


def restart(fleet: Fleet, worker: WorkerProcess) -> float:
    """SIGTERM to the main process only (as Docker, systemd and Kubernetes send it), wait for the exit,
    start the worker again under its name: the seconds the stop took."""
    stopped_at = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(120)
    took = time.monotonic() - stopped_at
    fleet.workers.remove(worker)
    queue, name, concurrency = next(spec for spec in WORKERS if worker.name.startswith(spec[1] + "@"))
    fleet.start(queue, name=name, concurrency=concurrency, wait=True)
    return took


def holds_one(store: RunStore, run_ids: list[str], worker: WorkerProcess) -> bool:
    """Whether ``worker`` runs one of ``run_ids`` past its first step."""
    records = (store.get(run_id) for run_id in run_ids)
    return any(record is not None and record.status is RunStatus.RUNNING and record.worker == worker.name
               and record.progress.iteration >= 2 for record in records)


def test_every_worker_restarted_one_by_one_while_20_runs_work(fleet: Fleet, stub: StubLLM, r) -> None:
    runs = [submit(r, stub, STEPS, tag=f"roll{i:02d}") for i in range(RUNS)]  # no tag a prefix of another
    store = RunStore(r)
    stops: dict[str, float] = {}
    for worker in list(fleet.workers):
        if worker.queue == "rlm":  # stop it while it holds runs, so it has something to hand back
            wait_until(partial(holds_one, store, [run_id for run_id, _ in runs], worker),
                       120, f"a run in its second step on {worker.name}")
        stops[worker.name] = restart(fleet, worker)
    records = [wait_status(r, run_id, timeout=240) for run_id, _ in runs]
    took = ", ".join(f"{name.split('@')[0]} {seconds:.1f}s" for name, seconds in stops.items())
    print(f"\nMEASURED rolling restart: the stops took {took}")

    assert [rec.status for rec in records] == [RunStatus.SUCCEEDED] * RUNS, [rec.error for rec in records]
    handed = [rec for rec in records if any(restart.get("handback") for restart in rec.restarts)]
    assert handed, "no run was handed back by a stopping rlm worker"
    for rec in handed:
        assert "handed back: worker roll" in str(rec.restart_reason), rec.restarts
        assert rec.attempt == 1 + len(rec.restarts), rec.restarts
    # No worker waited for its runs to end: each stop took well under one run's remaining steps.
    assert all(took < 30 for took in stops.values()), stops
    # Nothing ran twice to completion, nothing was paid twice: each run's script was played once, step by
    # step (the resumed attempts replayed the answered steps from the caches), and no prompt reached the stub twice.
    for (run_id, script), rec in zip(runs, records, strict=True):
        assert script.calls == list(range(len(STEPS))), (run_id, script.calls, rec.restarts)
        assert stored_result(r, run_id)["outputs"]["answers"] == [f"answer-{i}" for i in range(4)]
    assert prompt_repeats(stub) == {}
    wait_until(lambda: all(AsyncResult(run_id).state == "SUCCESS" for run_id, _ in runs), 10, "Celery's SUCCESS")
    wait_until(lambda: LeaseRegistry(r, 3).live() == [], 30, "every sandbox lease released")
