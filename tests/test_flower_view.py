"""What Flower and the run page show of runs (issue #10), on the test fleet.

Flower runs as users run it (``celery -A tasks flower`` with ``FLOWER_UNAUTHENTICATED_API=true``)
against the test Redis; its REST API must name each run's signature and inputs, show running
runs as STARTED with their progress, and end them SUCCESS / FAILURE; the llm worker's row counts
its sub-tasks. ``rlmq ui``'s run page is checked over HTTP and in headless Chromium (screenshots
under the test's tmp dir; skipped with the reason when Chromium is missing).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from rlmq.client import Client
from tests.support.fleet import Fleet, fleet_fixture, redis_url_of
from tests.support.net import free_port, http_get
from tests.support.screenshots import chromium_missing, dom, screenshot
from tests.support.stub_llm import ScriptedRoot, StubLLM, route
from tests.support.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_stub")]

SIGNATURE = "items: list[str] -> answers: list[str]"
SLOW = ["print('looking at', len(items), 'items')",
        "answers = llm_query_batched([f'about {x}' for x in items])\nimport time\nfor _ in range(40):\n"
        "    time.sleep(0.1)\nprint(answers)",
        "SUBMIT(answers=answers)"]


fleet = fleet_fixture(
    env={"RLMQ_LM": "openai/gpt-4o-mini", "OPENAI_API_KEY": "stub-key", "RLMQ_RATE_LIMIT_RPS": "5000",
         "RLMQ_RATE_LIMIT_BURST": "5000", "RLMQ_LEASE_TTL": "30"},
    workers=[("rlm", "rlm1", 2), ("llm", "llmA", 16)])


@pytest.fixture(scope="module")
def flower(fleet: Fleet) -> str:
    base = fleet.start_flower()
    time.sleep(2.0)  # Flower's event consumer is up a moment after its HTTP server
    return base


@pytest.fixture(scope="module")
def ui(redis_server) -> Iterator[tuple[str, str]]:
    """``rlmq ui``'s app with basic auth, served on a free loopback port: (base URL, credentials)."""
    from werkzeug.serving import make_server

    from rlmq.ui import create_app

    creds = "viewer:s3cret"
    port = free_port()
    client = Client(redis_server.url)
    server = make_server("127.0.0.1", port, create_app(client, basic_auth=creds), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", creds
    server.shutdown()
    client.close()


def submit(r, stub: StubLLM, steps: list[str], items: list[str], **kwargs) -> tuple[Client, str]:
    stub.set_responder(route(root=ScriptedRoot(steps), sub=lambda p: "fine: " + p[-10:]))
    client = Client(redis_url_of(r))
    return client, client.submit(SIGNATURE, {"items": items}, max_iters=5, **kwargs)


def flower_task(flower: str, run_id: str) -> dict:
    code, body = http_get(f"{flower}/api/task/info/{run_id}")
    return json.loads(body) if code == 200 else {}


def test_flower_shows_what_runs_are_while_they_work_and_how_they_end(fleet, flower, stub, r) -> None:
    client, run_id = submit(r, stub, SLOW, ["a fig", "a pear", "a plum"])
    wait_until(lambda: "iteration 2/5 · sub-calls 3" in str(flower_task(flower, run_id).get("result")), timeout=60,
               interval=0.2, what="Flower showing the run STARTED with its progress")
    task = flower_task(flower, run_id)
    assert task["state"] == "STARTED" and task["name"] == "rlmq.run_rlm"
    assert SIGNATURE in task["args"]
    assert "'items': 'list[3]" in task["kwargs"] and "a fig" not in task["kwargs"] + task["args"]
    assert task["started"] < task["timestamp"]  # progress events keep the run's start time
    code, body = http_get(f"{flower}/api/tasks?state=STARTED")
    assert code == 200 and run_id in json.loads(body), "the running run is not under Flower's Started filter"

    assert client.wait(run_id, timeout=60).status.value == "SUCCEEDED"
    wait_until(lambda: flower_task(flower, run_id).get("state") == "SUCCESS", timeout=20, what="SUCCESS")
    assert "3 sub-calls" in flower_task(flower, run_id)["result"] or "sub-calls 3" in flower_task(flower, run_id)["result"]

    # The llm worker's row counts its sub-tasks (task events on for llm_batch).
    code, body = http_get(f"{flower}/workers?json=1")
    rows = json.loads(body)["data"] if code == 200 else []
    llm = [w for w in rows if w.get("hostname", "").startswith("llmA@")]
    assert llm and llm[0].get("task-received", 0) >= 1, rows

    # A failed run ends FAILURE, its error on one line.
    client2, failed_id = submit(r, stub, SLOW, ["x"], tools=["rlmq_no_such_module:tool"])
    assert client2.wait(failed_id, timeout=60).status.value == "FAILED"
    wait_until(lambda: flower_task(flower, failed_id).get("state") == "FAILURE", timeout=20, what="FAILURE")
    assert "\\n" not in flower_task(flower, failed_id)["exception"]


def test_a_cancelled_run_ends_revoked_in_flower(fleet, flower, stub, r) -> None:
    client, run_id = submit(r, stub, ["import time\nfor _ in range(300):\n    time.sleep(0.1)", "SUBMIT(answers=[])"],
                            ["x"])
    wait_until(lambda: flower_task(flower, run_id).get("state") == "STARTED", timeout=60, what="STARTED")
    client.cancel(run_id)
    wait_until(lambda: flower_task(flower, run_id).get("state") == "REVOKED", timeout=20, what="REVOKED")


def test_run_page_shows_steps_live_and_the_answer(fleet, flower, ui, stub, r, tmp_path) -> None:
    base, creds = ui
    slower = [SLOW[0], SLOW[1].replace("range(40)", "range(150)"), SLOW[2]]  # 15 s: shots of a live run
    client, run_id = submit(r, stub, slower, ["a fig", "a pear"])
    assert http_get(f"{base}/run/{run_id}")[0] == 401  # basic auth, as Flower's
    assert http_get(f"{base}/run/{run_id}", auth="viewer:wrong")[0] == 401
    wait_until(lambda: len(client.trace(run_id)) >= 1 and client.status(run_id).progress.iteration == 2,
               timeout=60, interval=0.1, what="step 1 done, step 2 running")
    code, page = http_get(f"{base}/run/{run_id}", auth=creds)
    assert code == 200 and 'http-equiv="refresh"' in page and "RUNNING" in page
    assert "print(&#39;looking at&#39;" in page or "looking at" in page
    assert 'id="step-1"' in page and "looking at 2 items" in page

    missing = chromium_missing()
    if missing is None:
        flower_dom = dom(f"{flower}/tasks", wait_ms=5000)  # its list shows args, kwargs and live progress
        row = flower_dom[flower_dom.find(f'<tr id="{run_id}"'):]
        row = row[:row.find("</tr>")]
        assert "STARTED" in row and "iteration 2/5" in row and "list[2]" in row, row
        assert "items: list[str] -&gt; answers: list[str]" in row
        flower_png = screenshot(f"{flower}/tasks", tmp_path / "flower_tasks_live.png", size="1800,700", wait_ms=4000)
        assert flower_png.stat().st_size > 10_000
        user, password = creds.split(":")
        authed = base.replace("http://", f"http://{user}:{password}@")
        live = dom(f"{authed}/run/{run_id}", wait_ms=500)
        assert f"<title>rlmq run {run_id[:12]} · RUNNING</title>" in live and 'id="step-1"' in live
        assert 'id="step-running"' in live  # step 2 is in progress
        png = screenshot(f"{authed}/run/{run_id}", tmp_path / "run_page_live.png", wait_ms=500)
        assert png.stat().st_size > 10_000

    assert client.wait(run_id, timeout=60).status.value == "SUCCEEDED"
    code, page = http_get(f"{base}/run/{run_id}", auth=creds)
    assert code == 200 and 'id="answer"' in page and "fine: " in page and 'http-equiv="refresh"' not in page
    assert [f'id="step-{n}"' in page for n in (1, 2, 3)] == [True] * 3
    assert "sub-LLM" in page and "uncached" in page
    data = json.loads(http_get(f"{base}/api/run/{run_id}", auth=creds)[1])
    assert len(data["steps"]) == 3 and data["result"]["outputs"]["answers"][0].startswith("fine: ")
    sandbox = data["run"]["progress"]["sandbox"]  # the page says which sandbox ran the code
    assert sandbox["id"] and f"sandbox {sandbox['id']} (local, {sandbox['isolation']})" in page
    code, runs = http_get(f"{base}/", auth=creds)
    assert code == 200 and run_id[:12] in runs
    if missing is not None:
        pytest.skip(f"run page checked over HTTP only; Chromium part skipped: {missing}")
