"""The attack suite (tests/support/attacks.py) as the steps of a real run through the fleet.

Workers start from a directory whose ``.env`` holds a canary provider key, with the same canary in
their environment and in a ``.env`` in their HOME; the scripted root LM runs each attack as one
REPL step, and the host checks each step's verdict (and the filesystem) afterwards. With the
default isolation every attack fails; with ``RLMQ_LOCAL_ISOLATION=process`` the suite must catch
the leaks, so it can fail. On a Daytona fleet (``RLMQ_SANDBOX=daytona`` against the emulator, whose
API key is the canary too) the same attacks run in a Daytona sandbox, with another Daytona sandbox
as the victim. (The uid-65534 case runs the same attacks against the interpreter in
tests/test_sandbox_isolation.py; two attacks that need a second execute or the host token are
there only.)
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker_bridge import interpreter_factory
from rlmq.client import Client
from rlmq.store.blobs import put_blobs
from rlmq.store.records import RunSpec, RunStatus, RunStore, new_run_id
from tests.support.attacks import ATTACKS, CANARY_PREFIX, Target, parse_verdict
from tests.support.daytona_emulator.harness import running_emulator
from tests.support.fleet import Fleet, redis_url_of
from tests.support.records import stored_record, stored_result
from tests.support.sandboxes import needs_namespaces
from tests.support.stub_llm import ScriptedRoot, StubLLM, route

pytestmark = pytest.mark.slow
FLEET_ATTACKS = [a for a in ATTACKS if a.then is None and a.name != "broker_token"]
DAYTONA = "daytona"  # the sandbox kind of a Daytona fleet; else a local isolation mode


@contextlib.contextmanager
def victim_and_backend(kind: str, target: Target) -> Iterator[tuple[Any, dict[str, str]]]:
    """Another run's sandbox of the kind the fleet uses (the victim, aimed at), and the workers'
    environment choosing that kind. A Daytona fleet gets an emulator of its own whose API key is the
    canary: a Daytona key that reached a sandbox would be found like the provider key."""
    if kind != DAYTONA:
        victim = interpreter_factory("local", isolation=kind)()
        try:
            target.aim_at(victim)
            yield victim, {"RLMQ_LOCAL_ISOLATION": kind}
        finally:
            victim.shutdown()
        return
    with running_emulator(api_key=target.secret_canary) as emulator:
        victim = interpreter_factory(DAYTONA, api_url=emulator.api_url, api_key=target.secret_canary)()
        try:
            victim.start()
            (listed,) = emulator.sandboxes()
            target.aim_at_daytona(victim, listed)
            yield victim, {"RLMQ_SANDBOX": DAYTONA, **emulator.env()}
        finally:
            victim.shutdown()


def run_suite_through_the_fleet(kind: str, redis_server, stub: StubLLM, r, listener: int,
                                tmp_path: Path) -> dict[str, Any]:
    """``kind``: a local isolation mode, or ``DAYTONA``."""
    canary = CANARY_PREFIX + uuid.uuid4().hex
    workdir, home = tmp_path / "workers", tmp_path / "home"
    for d in (workdir, home):
        d.mkdir()
        (d / ".env").write_text(f"OPENAI_API_KEY={canary}\n")
    escape = tmp_path / "escaped.txt"
    target = Target(host_cwd=str(workdir), host_home=str(home), redis_port=redis_server.port,
                    listener_port=listener, write_targets=[str(escape), str(workdir / "planted.txt")],
                    secret_canary=canary)
    try:
        with victim_and_backend(kind, target) as (victim, backend):
            outcomes = _run_the_attacks(kind, backend, target, redis_server, stub, r, workdir, home)
            try:
                victim.execute("print('alive')")
                outcomes["victim_survived"] = True
            except Exception:
                outcomes["victim_survived"] = False
        return outcomes
    finally:
        if escape.exists():
            escape.unlink()


def _run_the_attacks(kind: str, backend: dict[str, str], target: Target, redis_server, stub: StubLLM, r,
                     workdir: Path, home: Path) -> dict[str, Any]:
    """One run of every attack through a fleet whose workers start in ``workdir`` with the canary."""
    steps = [a.code for a in FLEET_ATTACKS] + ["SUBMIT(verdicts=['done'])"]
    script = ScriptedRoot(steps)
    stub.set_responder(route(root=script, sub=lambda prompt: "sub"))
    env = {"RLMQ_LM": "openai/scripted-root", "RLMQ_SUB_LM": "openai/stub-sub", "RLMQ_LM_API_BASE": stub.api_base,
           "OPENAI_API_KEY": target.secret_canary, "RLMQ_CANARY": target.secret_canary, "HOME": str(home),
           **backend}
    with Fleet(redis_server.url, env, cwd=str(workdir)) as fleet:
        fleet.start("rlm", name=f"attacked-{kind}", concurrency=1)
        fleet.start("llm", name=f"attacked-llm-{kind}", concurrency=2)
        spec = RunSpec(run_id=new_run_id(), signature="target: dict -> verdicts: list[str]",
                       inputs=put_blobs(r, {"target": target.for_sandbox()}),
                       options={"max_iters": len(steps) + 2})
        Client(redis_url_of(r)).enqueue(spec)
        deadline = time.monotonic() + 400
        while not (RunStore(r).status(spec.run_id) or RunStatus.QUEUED).finished:
            assert time.monotonic() < deadline, fleet.workers[0].log_tail()
            time.sleep(0.2)
        record = stored_record(r, spec.run_id)
        assert record.status is RunStatus.SUCCEEDED, (record.error, fleet.workers[0].log_tail())
        trajectory = stored_result(r, spec.run_id)["trajectory"]
    outcomes: dict[str, Any] = {}
    for attack, step in zip(FLEET_ATTACKS, trajectory, strict=False):  # the last step is the SUBMIT
        verdict = parse_verdict(step["output"])
        outcomes[attack.name] = {"evidence": attack.check(verdict, target), "verdict": verdict}
    outcomes["isolation"] = record.progress.sandbox
    return outcomes


@pytest.mark.parametrize(("kind", "sandbox_kind"), [
    pytest.param("namespaces", ("local", "namespaces"), id="local"),
    # the emulator's sandbox (its own namespaces, no host files); its API key is the canary too
    pytest.param(DAYTONA, ("daytona", "vm"), marks=needs_namespaces, id="daytona"),
])
def test_every_attack_fails_through_the_fleet(redis_server, stub_llm: StubLLM, r, listener, tmp_path, kind: str,
                                              sandbox_kind: tuple[str, str]) -> None:
    outcomes = run_suite_through_the_fleet(kind, redis_server, stub_llm, r, listener, tmp_path)
    sandbox = outcomes.pop("isolation")
    assert (sandbox.backend, sandbox.isolation) == sandbox_kind
    assert outcomes.pop("victim_survived") is True
    succeeded = {name: o["evidence"] for name, o in outcomes.items() if o["evidence"]}
    assert not succeeded, f"attacks that got through the fleet's sandbox: {succeeded}"
    assert set(outcomes) == {a.name for a in FLEET_ATTACKS}
    assert outcomes["walk_filesystem"]["verdict"]["files"] > 100  # the attacks did look
    assert 1 <= outcomes["count_processes"]["verdict"]["count"] <= 6
    assert outcomes["other_sandbox"]["verdict"]["complete"] is True


def test_the_fleet_suite_catches_a_sandbox_that_is_no_boundary(redis_server, stub_llm: StubLLM, r, listener,
                                                               tmp_path) -> None:
    outcomes = run_suite_through_the_fleet("process", redis_server, stub_llm, r, listener, tmp_path)
    sandbox = outcomes.pop("isolation")
    assert (sandbox.backend, sandbox.isolation) == ("local", "process")
    outcomes.pop("victim_survived")
    succeeded = {name for name, o in outcomes.items() if o["evidence"]}
    must_catch = {"relative_dotenv", "host_cwd_and_home", "redis", "loopback_listener", "other_sandbox",
                  "count_processes"}
    assert must_catch <= succeeded, f"the suite missed leaks of a plain-process sandbox: {must_catch - succeeded}"

