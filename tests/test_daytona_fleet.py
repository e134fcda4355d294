"""rlmq's runs on Daytona, against the emulator (``tests.support.daytona_emulator``) driven by the
unmodified SDK: no Daytona sandbox outlives its run.

First the worker's wiring, in this process on real Redis: a sandbox is leased before it is created,
the lease says where it lives, a stopping run refuses a sandbox still booting, and recovery deletes a
dead attempt's sandboxes by label. Then a Celery fleet with ``RLMQ_SANDBOX=daytona`` (two rlm workers,
one llm worker, 3-s leases, 1-s sweeps): a fan-out run, cancels before the sandbox exists and during a
step, a SIGKILL of the worker mid-run and mid-boot, and API faults (a 500, a 429 storm, a lost create
reply, a toolbox 5xx storm, an API that hangs during the create or a step). docs/reliability.md's
Daytona table is made of the ``MEASURED`` lines these print with ``-s``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("daytona")
from daytona import CreateSandboxFromSnapshotParams

from broker_bridge import BackendName, SandboxError, SandboxInfo, SandboxStartError, interpreter_factory
from broker_bridge.backends.daytona import client as daytona_client_module
from rlmq.client import Client
from rlmq.demo import CHARACTERS
from rlmq.store.records import RunRecord, RunStatus, RunStore
from tests.support.cli import cli_env, processes_with_cmdline, rlmq
from tests.support.daytona_emulator.harness import EmulatorProcess, running_emulator
from tests.support.demo_script import DEMO, demo_sub_answer
from tests.support.fleet import REPO_ROOT, Fleet, WorkerProcess, redis_url_of, started_fleet
from tests.support.reliability import WORKER_ENV, batch_step, prompt_repeats, submit, wait_status
from tests.support.sandboxes import needs_namespaces
from tests.support.stub_llm import StubLLM, route
from tests.support.wait import wait_until
from workers.run_engine import sandbox_ttl_minutes
from workers.sandbox_registry import (
    LeaseKeeper,
    LeaseRegistry,
    attempt_labels,
    reap_attempt,
    reap_expired,
)

pytestmark = [
    pytest.mark.slow,
    needs_namespaces,
]

LEASE_SECONDS = float(WORKER_ENV["RLMQ_LEASE_TTL"])
SWEEP_SECONDS = float(WORKER_ENV["RLMQ_MAINTENANCE_INTERVAL"])


def of_run(emulator: EmulatorProcess, run_id: str, attempt: int | None = None) -> list[dict]:
    """The emulator's sandboxes of ``run_id`` (of one attempt if given), whatever their state."""
    wanted = attempt_labels(run_id, attempt) if attempt else {"rlmq.run": run_id}
    return [s for s in emulator.sandboxes() if all(s["labels"].get(k) == v for k, v in wanted.items())]


# ------------------------------------------------------------------ the worker's wiring

def test_sandbox_ttl_follows_the_run_time_limit() -> None:
    assert sandbox_ttl_minutes(None, 6 * 3600) == 6 * 60 + 10  # the worker's limit
    assert sandbox_ttl_minutes(600, 6 * 3600) == 20  # the run's own, shorter
    assert sandbox_ttl_minutes(10 * 3600, 3600) == 70  # never past the worker's


def test_a_sandbox_is_leased_before_it_exists_and_reaped_where_it_lives(daytona_env, redis_client,
                                                                         monkeypatch) -> None:
    """The lease is there while Daytona is still creating the sandbox, and it names the run's Daytona,
    which a reaper whose environment points elsewhere still reaches."""
    # The create takes 5 s so that the "creating" state is seen even when a loaded machine is slow to send
    # it (the SDK's first call imports and connects: over 10 s with a load of 16 on 2 cores).
    with running_emulator("--create-delay", "5", api_key=daytona_env.api_key) as runs_daytona:
        registry = LeaseRegistry(redis_client, ttl_seconds=0.5)
        keeper = LeaseKeeper(registry, run_id="run-a", owner="dead-worker")
        factory = interpreter_factory("daytona", api_url=runs_daytona.api_url, labels=attempt_labels("run-a", 1),
                                      on_sandbox_creating=keeper.creating, on_sandbox_created=keeper.created,
                                      on_sandbox_destroyed=keeper.destroyed)
        interpreter = factory()
        boot = threading.Thread(target=interpreter.start, daemon=True)
        boot.start()
        try:
            creating = wait_until(lambda: [s for s in runs_daytona.sandboxes() if s["state"] == "creating"], 60,
                                  "the sandbox being created")
            (lease_id,) = registry.live()
            assert creating[0]["name"] == lease_id and creating[0]["labels"]["rlmq.attempt"] == "1"
            boot.join(30)
            assert interpreter.execute("print(6 * 7)").strip() == "42"
            # The worker "dies": nothing renews the lease, and this reaper's environment names another Daytona.
            monkeypatch.setenv("DAYTONA_API_URL", daytona_env.api_url)
            daytona_client_module.forget_clients()
            time.sleep(0.6)
            (reaped,) = reap_expired(redis_client, time.time())
            assert reaped.provider == {"api_url": runs_daytona.api_url} and reaped.sandbox_id == lease_id
            assert wait_until(lambda: runs_daytona.sandboxes() == [], 15, "the sandbox deleted where it lives")
            assert registry.live() == [] and registry.homes("run-a") == [("daytona", reaped.provider)]
        finally:
            interpreter.shutdown()


def test_a_stopping_run_refuses_a_sandbox_still_booting(daytona_env, redis_client) -> None:
    """A cancel that arrives while the sandbox is being created is not lost: the sandbox is deleted as
    its boot ends, and no later one may start."""
    daytona_env.clock(create_delay=5.0)  # wide enough to be seen on a loaded machine (above)
    registry = LeaseRegistry(redis_client, ttl_seconds=5)
    keeper = LeaseKeeper(registry, run_id="run-b", owner="w")
    factory = interpreter_factory("daytona", labels=attempt_labels("run-b", 1), on_sandbox_creating=keeper.creating,
                                  on_sandbox_created=keeper.created, on_sandbox_destroyed=keeper.destroyed)
    interpreter = factory()
    failure: list[BaseException] = []
    boot = threading.Thread(target=lambda: _catch(interpreter.start, failure), daemon=True)
    boot.start()
    wait_until(lambda: of_run(daytona_env, "run-b"), 60, "the sandbox being created")
    keeper.close("cancel requested")  # what the run's ticker does on a cancel
    boot.join(30)
    assert len(failure) == 1 and isinstance(failure[0], SandboxError), failure
    assert "stopping (cancel requested)" in str(failure[0])
    assert wait_until(lambda: of_run(daytona_env, "run-b") == [], 15, "the booted sandbox deleted")
    assert registry.live() == [] and keeper.held() == []
    daytona_env.reset_requests()
    with pytest.raises(SandboxStartError, match="stopping"):
        factory().start()
    assert daytona_env.requests().get("api POST /api/sandbox", 0) == 0


def _catch(call, into: list[BaseException]) -> None:
    try:
        call()
    except BaseException as exc:
        into.append(exc)


def test_recovery_reaps_a_dead_attempts_orphans_by_label(daytona_env, redis_client) -> None:
    """A sandbox no lease names (its create completed after the lease was reaped) is found by its
    attempt's labels, on the Daytona the run registered; another attempt's is left alone."""
    client = daytona_env.client()
    registry = LeaseRegistry(redis_client, ttl_seconds=5)
    for attempt in (1, 2):
        labels = {**attempt_labels("run-c", attempt), "rlmq.sandbox": f"rlmq-c{attempt}"}
        client.create(CreateSandboxFromSnapshotParams(name=f"rlmq-c{attempt}", labels=labels), timeout=60)
        info = SandboxInfo(backend=BackendName.DAYTONA, sandbox_id=f"rlmq-c{attempt}", labels=labels,
                           provider={"api_url": daytona_env.api_url})
        registry.register(info, run_id="run-c", owner="w")
        registry.release(info.sandbox_id)  # reaped long ago: no lease names it any more
    assert reap_attempt(redis_client, "run-c", 1) == 1
    assert [s["name"] for s in daytona_env.sandboxes()] == ["rlmq-c2"]
    assert reap_attempt(redis_client, "run-c", 1) == 0 and reap_attempt(redis_client, "run-none", 1) == 0


# ------------------------------------------------------------------ the demo, as a user runs it

def test_the_monte_cristo_demo_runs_on_daytona(tmp_path, daytona_env, stub_llm: StubLLM) -> None:
    """``rlmq demo monte-cristo --sandbox daytona`` with only the emulator's URL and key in the
    environment: the demo's own stack runs the analysis in a Daytona sandbox and deletes it."""
    stub_llm.set_responder(route(root=DEMO, sub=demo_sub_answer))
    env = cli_env(tmp_path, RLMQ_LM="openai/scripted-root", RLMQ_SUB_LM="openai/stub-sub",
                  RLMQ_LM_API_BASE=stub_llm.api_base, OPENAI_API_KEY="stub-key", **daytona_env.env())
    result = rlmq("demo", "monte-cristo", "--sandbox", "daytona", "--output-dir", str(tmp_path / "out"), env=env,
                  cwd=tmp_path, timeout=600)
    assert result.code == 0, result.stderr
    rows = json.loads((tmp_path / "out" / "monte_cristo_wealth.json").read_text())
    assert len(rows) == 117 * 5 and {r["character"] for r in rows} == set(CHARACTERS)
    assert (tmp_path / "out" / "monte_cristo_wealth.png").read_bytes().startswith(b"\x89PNG")
    assert daytona_env.requests().get("api POST /api/sandbox", 0) == 1  # the code ran on Daytona
    assert wait_until(lambda: daytona_env.sandboxes() == [], 15, "the demo's sandbox deleted")


def test_the_readme_daytona_commands_work_as_written(tmp_path, stub_llm: StubLLM) -> None:
    """The README's Daytona block, run by bash exactly as written, in a directory with the quick
    start's ``.env`` and the virtualenv's ``python`` and ``rlmq`` first on ``PATH``."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- ci:daytona -->\n```bash\n(.*?)```", readme, re.DOTALL)
    assert block, "README.md lost its ci:daytona block"
    stub_llm.set_responder(route(root=DEMO, sub=demo_sub_answer))
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY=stub-key\nRLMQ_LM_API_BASE={stub_llm.api_base}\n")
    env = cli_env(tmp_path)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for name in ("DAYTONA_API_URL", "DAYTONA_API_KEY", "DAYTONA_TARGET"):
        env.pop(name, None)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.group(1)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"succeeded .* sandbox rlmq-[0-9a-f]{16} \(daytona, vm\)", done.stderr), done.stderr[-3000:]
    rows = json.loads((tmp_path / "rlmq-output" / "monte_cristo_wealth.json").read_text())
    assert len(rows) == 117 * 5
    url = (tmp_path / "daytona-emulator.url").read_text().splitlines()[0]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    assert wait_until(lambda: not processes_with_cmdline("daytona_emulator --port 0 --api-key dev-key"), 20,
                      "the emulator stopped by the block's kill")


# ------------------------------------------------------------------ a fleet on Daytona

@pytest.fixture(scope="module")
def fleet(redis_server, stub: StubLLM, daytona_emulator: EmulatorProcess) -> Iterator[Fleet]:
    env = {**WORKER_ENV, "RLMQ_SANDBOX": "daytona", **daytona_emulator.env(), "RLMQ_LM_API_BASE": stub.api_base}
    with started_fleet(redis_server.url, env, [("rlm", "rlm1", 1), ("rlm", "rlm2", 1), ("llm", "llmA", 8)],
                       timeout=180) as fleet:
        yield fleet


@pytest.fixture
def on_daytona(fleet: Fleet, emulator: EmulatorProcess, fresh_stub: StubLLM, r) -> EmulatorProcess:
    """The fleet's emulator, its faults, clock and sandboxes reset around the test."""
    return emulator


ANSWERS = [f"answer-{i}" for i in range(12)]


def record_of(r, run_id: str) -> RunRecord:
    record = RunStore(r).get(run_id)
    assert record is not None, f"run {run_id} has no record"
    return record


def answers_of(r, run_id: str) -> list[str]:
    result = RunStore(r).result(run_id)
    assert result is not None, f"run {run_id} has no result"
    return result["outputs"]["answers"]


def holder_of(fleet: Fleet, hostname: str | None) -> WorkerProcess:
    return next(w for w in fleet.workers if w.name == hostname and w.alive)


def replace(fleet: Fleet, dead: WorkerProcess) -> None:
    """Start a worker in place of a killed one, for the tests after this one."""
    fleet.workers.remove(dead)
    fleet.start(dead.queue, name=dead.name.split("@")[0], concurrency=1, wait=True)


def test_a_fan_out_run_succeeds_in_a_daytona_sandbox(on_daytona, stub: StubLLM, r) -> None:
    run_id, script = submit(r, stub, ["print(items)", batch_step(12, then="import time\ntime.sleep(2)"),
                                      "SUBMIT(answers=answers)"], options={"time_limit": 600}, tag="dt-fanout")
    (sandbox,) = wait_until(lambda: [s for s in of_run(on_daytona, run_id) if s["state"] == "started"], 60,
                            "the run's sandbox started")
    assert sandbox["labels"]["rlmq.attempt"] == "1" and sandbox["labels"]["rlmq.sandbox"] == sandbox["name"]
    ttl = datetime.fromisoformat(sandbox["autoDestroyAt"]) - datetime.fromisoformat(sandbox["createdAt"])
    assert ttl.total_seconds() == pytest.approx((10 + 10) * 60, abs=1)  # the run's 600-s limit + 10 min
    assert sandbox["public"] is False
    done = wait_status(r, run_id, timeout=120)
    assert done.status is RunStatus.SUCCEEDED, (done.error, done.error_detail)
    assert answers_of(r, run_id) == ANSWERS and script.calls == [0, 1, 2]
    assert done.progress.sandbox is not None
    assert (done.progress.sandbox.backend, done.progress.sandbox.isolation) == ("daytona", "vm")
    assert wait_until(lambda: of_run(on_daytona, run_id) == [], 15, "the sandbox deleted")
    assert LeaseRegistry(r, LEASE_SECONDS).live() == []


def test_a_cancel_before_the_sandbox_exists_stops_the_run(on_daytona, stub: StubLLM, r) -> None:
    on_daytona.clock(create_delay=3.0)
    run_id, script = submit(r, stub, ["import time\ntime.sleep(60)", "SUBMIT(answers=[])"], tag="dt-early-cancel")
    wait_until(lambda: [s for s in of_run(on_daytona, run_id) if s["state"] == "creating"], 60,
               "the run's sandbox being created")
    asked = time.monotonic()
    Client(redis_url_of(r)).cancel(run_id)
    done = wait_status(r, run_id, timeout=30)
    print(f"\nMEASURED cancel during the create: CANCELLED after {time.monotonic() - asked:.1f}s")
    assert done.status is RunStatus.CANCELLED, (done.error, done.error_detail)
    assert script.calls == []  # neither the root LM nor the step (a minute's sleep) ran
    assert wait_until(lambda: of_run(on_daytona, run_id) == [], 15, "the sandbox deleted once it booted")
    assert LeaseRegistry(r, LEASE_SECONDS).live() == []


def test_a_cancel_during_a_step_deletes_the_sandbox(on_daytona, stub: StubLLM, r) -> None:
    run_id, _ = submit(r, stub, ["import time\nfor _ in range(600):\n    time.sleep(0.1)", "SUBMIT(answers=[])"],
                       tag="dt-cancel")
    wait_until(lambda: record_of(r, run_id).progress.iteration == 1, 60, "the step running")
    asked = time.monotonic()
    Client(redis_url_of(r)).cancel(run_id)
    done = wait_status(r, run_id, timeout=20)
    assert done.status is RunStatus.CANCELLED and time.monotonic() - asked < 15
    assert wait_until(lambda: of_run(on_daytona, run_id) == [], 15, "the sandbox deleted")
    assert LeaseRegistry(r, LEASE_SECONDS).live() == []


@pytest.mark.parametrize("when", ["mid-run", "mid-boot"])
def test_a_killed_worker_leaves_no_sandbox_of_its_attempt(fleet: Fleet, on_daytona, stub: StubLLM, r,
                                                          when: str) -> None:
    """SIGKILL of the rlm worker holding the run: the run resumes on the other worker, and within a lease
    and a sweep (plus the deletion) the emulator lists no sandbox of the dead attempt."""
    steps = ["print(items)", batch_step(12, then="import time\ntime.sleep(4)"), "SUBMIT(answers=answers)"]
    if when == "mid-boot":
        on_daytona.clock(create_delay=30.0)
    run_id, _ = submit(r, stub, steps, tag=f"dt-kill-{when}")
    if when == "mid-boot":
        wait_until(lambda: [s for s in of_run(on_daytona, run_id) if s["state"] == "creating"], 60, "creating")
    else:
        wait_until(lambda: record_of(r, run_id).progress.iteration == 2 and of_run(on_daytona, run_id), 60,
                   "the run in its second step")
    holder = holder_of(fleet, record_of(r, run_id).worker)
    fleet.kill(holder)
    killed_at = time.monotonic()
    on_daytona.clock(create_delay=0.0)  # the next attempt boots at once
    bound = LEASE_SECONDS + SWEEP_SECONDS + 10.0  # the lease lapses, a sweep notices, the deletion runs
    try:
        assert wait_until(lambda: of_run(on_daytona, run_id, 1) == [], bound, "no sandbox of attempt 1")
        gone_after = time.monotonic() - killed_at
        done = wait_status(r, run_id, timeout=120)
        print(f"\nMEASURED kill {when}: attempt 1's sandbox gone {gone_after:.1f}s after the kill, "
              f"run {done.status.value} after {time.monotonic() - killed_at:.1f}s")
        assert done.status is RunStatus.SUCCEEDED and done.attempt == 2, (done.error, done.restarts)
        assert answers_of(r, run_id) == ANSWERS
        assert prompt_repeats(stub) == {}  # the replay read the caches
        assert wait_until(lambda: of_run(on_daytona, run_id) == [], 15, "attempt 2's sandbox deleted")
        assert LeaseRegistry(r, LEASE_SECONDS).live() == []
    finally:
        replace(fleet, holder)


@pytest.mark.parametrize("fault", ["create-500", "create-429", "lost-create", "toolbox-5xx-storm"])
def test_daytona_api_faults_end_a_run_in_one_line_or_not_at_all(on_daytona, stub: StubLLM, r, fault: str) -> None:
    """The API misbehaves while the fleet boots a run's sandbox: the run either completes or fails with a
    one-line reason within its bounds, and no sandbox or lease is left behind. A rate limit is waited out."""
    if fault == "create-500":
        on_daytona.faults(fail=[{"scope": "api", "status": 500, "count": 1, "method": "POST", "path": "/api/sandbox",
                                 "message": "Internal server error"}])
    elif fault == "create-429":
        on_daytona.faults(fail=[{"scope": "api", "status": 429, "count": 3, "method": "POST", "path": "/api/sandbox",
                                 "message": "ThrottlerException: Too Many Requests"}])
    elif fault == "lost-create":
        on_daytona.faults(lose_create=1)
    else:
        on_daytona.faults(fail=[{"scope": "toolbox", "status": 502, "count": 5}])
    started = time.monotonic()
    run_id, _ = submit(r, stub, ["print(items)", batch_step(12), "SUBMIT(answers=answers)"], tag=f"dt-fault-{fault}")
    done = wait_status(r, run_id, timeout=150)
    print(f"\nMEASURED {fault}: run {done.status.value} after {time.monotonic() - started:.1f}s: {done.error or ''}")
    assert done.status in (RunStatus.SUCCEEDED, RunStatus.FAILED), (done.status, done.error)
    if fault == "create-429":
        assert done.status is RunStatus.SUCCEEDED, done.error  # three 429s with Retry-After: 1, then a sandbox
    if done.status is RunStatus.SUCCEEDED:
        assert answers_of(r, run_id) == ANSWERS
    else:
        assert done.error and "\n" not in done.error and "Traceback" not in done.error, done.error
    on_daytona.clear_faults()
    assert wait_until(lambda: of_run(on_daytona, run_id) == [], 30, "no sandbox of the run left")
    # released by the worker just after the record is final, or at the latest reaped after lease + sweep
    wait_until(lambda: LeaseRegistry(r, LEASE_SECONDS).live() == [], 10, "the run's leases released")


HUNG_BOOT_TIMEOUT = 6.0  # the run's own daytona_boot_timeout: the bound a hung create must end within
HUNG_STEP_TIMEOUT = 6.0  # the run's own execution_timeout: the bound a step on a hung toolbox ends within


@pytest.mark.parametrize("when", ["create", "step"])
def test_a_hung_daytona_api_fails_the_run_within_its_bound(on_daytona, stub: StubLLM, r, when: str) -> None:
    """The API stops answering (requests held, unanswered) during the create, or the toolbox during a
    step: the run fails in one line within its bound (the boot's, the step's) plus a sweep, not at the
    API's own timeouts; once the API answers again, no sandbox and no lease of the run is left."""
    # each case lowers only its own bound: a loaded machine may take more than 6 s for a healthy boot
    options = {"daytona_boot_timeout": HUNG_BOOT_TIMEOUT} if when == "create" else {"execution_timeout": HUNG_STEP_TIMEOUT}
    steps = ["import time\ntime.sleep(2)", "print('second step')", "SUBMIT(answers=[])"]
    if when == "create":
        on_daytona.faults(hang=["api"])
    run_id, script = submit(r, stub, steps, options=options, tag=f"dt-hung-{when}")
    if when == "step":
        # Code runs through the toolbox's interpreter websocket: the bootstrap and DSPy's setup before the
        # first root call, then each step. Once the first step's is open, the toolbox hangs for the second.
        def first_step_running() -> bool:
            runs = sum(n for k, n in on_daytona.requests().items() if k.endswith("/interpreter/execute"))
            record = record_of(r, run_id)
            assert not record.status.finished, (record.status, record.error, script.calls, on_daytona.requests())
            return script.calls == [0] and runs >= 3

        wait_until(first_step_running, 60, "the first step running")
        on_daytona.faults(hang=["toolbox"])
    started = time.monotonic()
    done = wait_status(r, run_id, timeout=60)
    took = time.monotonic() - started
    print(f"\nMEASURED hung API during the {when}: run {done.status.value} after {took:.1f}s: {done.error}")
    assert done.status is RunStatus.FAILED, (done.status, done.error)
    assert done.error and "\n" not in done.error and "Traceback" not in done.error, done.error
    if when == "step":
        assert script.calls[:2] == [0, 1], script.calls  # the second step was asked for, and hung
    bound = HUNG_BOOT_TIMEOUT if when == "create" else HUNG_STEP_TIMEOUT
    # plus the 10 s a failed boot or a destroy waits for the deletion it asked for, and 5 s of slack
    assert took < bound + 10.0 + 5.0, f"the run took {took:.1f}s to fail, its bound is {bound:g}s"
    on_daytona.clear_faults()  # the API answers again: held requests go on (a held create makes its sandbox)
    released = time.monotonic()
    assert wait_until(lambda: of_run(on_daytona, run_id) == [], LEASE_SECONDS + SWEEP_SECONDS + 15,
                      "no sandbox of the run left")
    wait_until(lambda: LeaseRegistry(r, LEASE_SECONDS).live() == [], 10, "the run's leases released")
    print(f"MEASURED hung API during the {when}: no sandbox left {time.monotonic() - released:.1f}s after "
          "the API came back")
