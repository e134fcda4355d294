"""An rlm worker and the isolation of its local sandboxes: refused where namespaces are missing,
and the explicit process mode said in the worker's log, the run's record and `rlmq status`."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from broker_bridge.backends import bwrap
from rlmq.client import Client
from rlmq.stack import worker_command
from rlmq.store.blobs import put_blobs
from rlmq.store.records import RunSpec, RunStatus, RunStore, new_run_id
from tests.support.cli import cli_env, rlmq
from tests.support.fleet import REPO_ROOT, Fleet, redis_url_of
from tests.support.records import stored_record
from tests.support.stub_llm import ScriptedRoot, StubLLM, route

pytestmark = pytest.mark.slow
BWRAP = bwrap.probe()[0]


@pytest.mark.skipif(BWRAP is None, reason=f"no namespaces here: {bwrap.probe()[1]}")
def test_an_rlm_worker_without_user_namespaces_refuses_to_start_naming_the_fix(redis_url, tmp_path) -> None:
    """The worker runs in a bwrap of its own that sees the whole machine but forbids user
    namespaces (as a locked-down container does): it stops at start with one line."""
    assert BWRAP is not None
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO_ROOT), "HOME": str(tmp_path),
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "REDIS_URL": redis_url, "RLMQ_LM": "openai/x",
           "RLMQ_LM_API_BASE": "http://127.0.0.1:9/v1"}
    command = [BWRAP, "--dev-bind", "/", "/", "--unshare-user", "--disable-userns", "--die-with-parent", "--",
               *worker_command("rlm", name="locked", concurrency=1, pool="prefork")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("rlmq worker:")]
    assert len(lines) == 1, done.stderr[-2000:]
    assert "local sandboxes cannot be isolated here" in lines[0]
    assert "apt-get install bubblewrap" in lines[0] and "RLMQ_LOCAL_ISOLATION=process" in lines[0]
    # The same worker that accepts plain processes knowingly starts (and says so).
    env["RLMQ_LOCAL_ISOLATION"] = "process"
    started = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=tmp_path, start_new_session=True)
    try:
        assert started.stdout is not None
        deadline, log = time.monotonic() + 90, ""
        while " ready." not in log:
            assert time.monotonic() < deadline and started.poll() is None, log[-2000:]
            log += started.stdout.readline()
        assert "NOT a security boundary" in log
    finally:
        os.killpg(started.pid, 9)
        started.wait(10)


def test_a_run_in_process_mode_says_so_in_its_record_and_status(redis_server, stub_llm: StubLLM, r,
                                                                 tmp_path) -> None:
    env = {"RLMQ_LM": "openai/scripted-root", "RLMQ_SUB_LM": "openai/stub-sub", "RLMQ_LM_API_BASE": stub_llm.api_base,
           "OPENAI_API_KEY": "stub-key", "RLMQ_LOCAL_ISOLATION": "process"}
    script = ScriptedRoot(["SUBMIT(answer='done')"])
    stub_llm.set_responder(route(root=script, sub=lambda prompt: "sub"))
    with Fleet(redis_server.url, env) as fleet:
        rlm = fleet.start("rlm", name="procmode", concurrency=1)
        fleet.start("llm", name="procmode-llm", concurrency=2)
        spec = RunSpec(run_id=new_run_id(), signature="question -> answer", inputs=put_blobs(r, {"question": "?"}))
        Client(redis_url_of(r)).enqueue(spec)
        deadline = time.monotonic() + 90
        while not (RunStore(r).status(spec.run_id) or RunStatus.QUEUED).finished:
            assert time.monotonic() < deadline, rlm.log_tail()
            time.sleep(0.1)
        record = stored_record(r, spec.run_id)
        assert record.status is RunStatus.SUCCEEDED, record.error
        sandbox = record.progress.sandbox
        assert sandbox is not None and (sandbox.backend, sandbox.isolation) == ("local", "process")
        line = rlmq("status", spec.run_id, env=cli_env(tmp_path, REDIS_URL=redis_url_of(r)), cwd=tmp_path).stdout
        assert "no security boundary" in line and f"sandbox {sandbox.id} (local, process)" in line, line
        assert "NOT a security boundary" in rlm.log_tail(400)
        assert "no security boundary" in rlm.log_tail(400).split("NOT a security boundary", 1)[1]  # the run's warning
