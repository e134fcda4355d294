"""`rlmq ui` as a user starts it: loopback by default, basic auth from the flag or FLOWER_BASIC_AUTH,
and no serving on another address without auth. Run pages themselves: tests/test_flower_view.py."""

from __future__ import annotations

import subprocess

from rlmq.store.records import RunSpec, RunStore
from tests.support.cli import RLMQ, cli_env, rlmq
from tests.support.net import free_port, http_status
from tests.support.wait import wait_until


def test_ui_serves_run_pages_behind_basic_auth(tmp_path, redis_url, redis_client) -> None:
    RunStore(redis_client).create(RunSpec(run_id="queued-run-1", signature="a -> b", inputs={}))
    port = free_port()
    env = cli_env(tmp_path, REDIS_URL=redis_url, FLOWER_BASIC_AUTH="admin:pw")
    ui = subprocess.Popen([*RLMQ, "ui", "--port", str(port)], env=env, cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(base + "/") == 401, timeout=30, what="rlmq ui answering")
        assert http_status(base + "/", auth="admin:pw") == 200
        assert http_status(base + "/run/queued-run-1", auth="admin:pw") == 200
        assert http_status(base + "/run/no-such-run", auth="admin:pw") == 404
    finally:
        ui.terminate()
        ui.wait(10)


def test_ui_refuses_a_public_address_without_auth(tmp_path, redis_url) -> None:
    done = rlmq("ui", "--address", "0.0.0.0", env=cli_env(tmp_path, REDIS_URL=redis_url), cwd=tmp_path)
    assert done.code == 2 and "without --basic-auth" in done.stderr and "Traceback" not in done.stderr


def test_trace_of_an_unknown_run_is_a_one_line_error(tmp_path, redis_url) -> None:
    done = rlmq("trace", "nope", env=cli_env(tmp_path, REDIS_URL=redis_url), cwd=tmp_path)
    assert done.code == 4 and done.stderr.startswith("rlmq: error: no run with id 'nope'")


def test_the_views_never_import_dspy_or_the_worker_runtime() -> None:
    code = ("import sys, rlmq.client, rlmq.ui, rlmq.cli_show, rlmq.fleet, rlmq.trace, rlmq.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'dspy', 'litellm', 'workers', 'tasks', 'broker_bridge'}))")
    done = subprocess.run([RLMQ[0], "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
