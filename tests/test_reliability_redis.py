"""Redis outages lose nothing: stop and restart Redis (AOF on, as in compose) during a batch and the
run still SUCCEEDS with every answer; stop the Redis of ``rlmq up`` and the stack restarts it on its
data, the run stays visible and finishes, and a new ``rlmq up`` still knows the run and its result.

Real Redis servers, real worker processes, local sandboxes, the stub LLM over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from rlmq.client import Client
from rlmq.local_redis import PrivateRedis, start_private_redis
from rlmq.store.records import RunStatus
from tests.support.cli import RLMQ, cli_env
from tests.support.fleet import Fleet, started_fleet
from tests.support.records import stored_result
from tests.support.reliability import WORKER_ENV, batch_step, sub_requests, submit, wait_status
from tests.support.stub_llm import StubLLM
from tests.support.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_stub")]


@pytest.fixture(scope="module")
def aof_redis(tmp_path_factory) -> Iterator[PrivateRedis]:
    server = start_private_redis(dir=str(tmp_path_factory.mktemp("aof")), appendonly=True)
    holder = {"server": server}
    yield holder  # type: ignore[misc]
    holder["server"].stop()


@pytest.fixture(scope="module")
def fleet(aof_redis, stub: StubLLM) -> Iterator[Fleet]:
    env = {**WORKER_ENV, "RLMQ_LM_API_BASE": stub.api_base}
    with started_fleet(aof_redis["server"].url, env, [("rlm", "rlm1", 1), ("llm", "llmA", 4), ("llm", "llmB", 4)],
                       timeout=180) as fl:
        yield fl


def test_redis_restart_during_a_batch_loses_no_answer(fleet: Fleet, aof_redis, stub: StubLLM) -> None:
    server = aof_redis["server"]
    r = redis.Redis.from_url(server.url)
    stub.latency = 0.3
    run_id, _ = submit(r, stub, ["print(items)", batch_step(40), "SUBMIT(answers=answers)"], tag="redis-restart")
    wait_until(lambda: sub_requests(stub) >= 6, 60, "the batch under way")
    server.stop()  # SIGTERM: Redis writes its AOF and exits
    time.sleep(5.0)  # longer than the workers' 3-s leases: every claim and sandbox lease lapses
    aof_redis["server"] = start_private_redis(server.port, dir=server.dir, appendonly=True, password=server.password)
    back_at = time.monotonic()

    record = wait_status(r, run_id, timeout=120)
    print(f"\nMEASURED Redis down 5 s mid-batch: run succeeded {time.monotonic() - back_at:.1f}s after Redis was back")
    assert record.status is RunStatus.SUCCEEDED, (record.error, record.error_detail)
    answers = stored_result(r, run_id)["outputs"]["answers"]
    assert answers == [f"answer-{i}" for i in range(40)]  # none came back as [ERROR]
    assert record.attempt == 1  # the owner re-took its lapsed claim; its sandbox was not reaped
    assert all(w.alive for w in fleet.workers)


def test_an_llm_worker_running_a_sub_task_outlives_a_redis_restart(fleet: Fleet, aof_redis, stub: StubLLM) -> None:
    """One sub-task running (unacked: acks_late) on an llm worker with free slots (its BRPOP pending) as
    Redis stops: the worker reconnects when Redis is back (``workers.broker_close``); it used to exit
    ("Unrecoverable error: AttributeError"), and a fleet with one llm worker then answered nothing more."""
    server = aof_redis["server"]
    r = redis.Redis.from_url(server.url)
    stub.latency = 3.0  # the sub-call is still at the stub when Redis stops
    run_id, _ = submit(r, stub, [batch_step(1), "SUBMIT(answers=answers)"], tag="subtask-running")
    wait_until(lambda: sub_requests(stub) >= 1, 60, "the sub-task running")
    server.stop()
    time.sleep(4.0)
    aof_redis["server"] = start_private_redis(server.port, dir=server.dir, appendonly=True, password=server.password)

    record = wait_status(r, run_id, timeout=120)
    assert record.status is RunStatus.SUCCEEDED, (record.error, record.error_detail)
    assert stored_result(r, run_id)["outputs"]["answers"] == ["answer-0"]
    # a worker that lost its consumer exits once its running sub-task ends, before the run's 3-s SUBMIT step ends
    dead = [f"{w.name}:\n{w.log_tail(30)}" for w in fleet.workers if not w.alive]
    assert not dead, "\n".join(dead)


def start_up(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, str]:
    log = cwd / f"up-{len(list(cwd.glob('up-*.log')))}.log"
    with open(log, "w") as output:
        process = subprocess.Popen([*RLMQ, "up", "--no-flower", "--no-exporter", "--llm-concurrency", "8", "--rlm-concurrency", "1"],
                                   env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if re.search(r"REDIS_URL=(\S+)", log.read_text()):
            # rlmq up prints the URL with its password masked: the full one is in the 0600 state file
            state = json.loads((Path(env["RLMQ_STATE_DIR"]) / "stack.json").read_text())
            return process, state["redis_url"]
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"rlmq up did not come up: {log.read_text()}")


def up_log(cwd: Path) -> str:
    text = "".join(p.read_text() for p in sorted(cwd.glob("up-*.log")))
    logs = re.findall(r"logs: (\S+)", text)
    tails = [f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
             for d in logs[-1:] for p in sorted(Path(d).glob("*.log"))]
    return text + "\n".join(tails)


def redis_pid(port: int) -> int:
    """The redis-server listening on ``port``."""
    for conn in psutil.net_connections("tcp"):
        if (conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid
                and "redis-server" in psutil.Process(conn.pid).name()):
            return conn.pid
    raise AssertionError(f"no redis-server on port {port}")


def stop_up(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def test_rlmq_up_redis_restart_keeps_the_run(tmp_path, stub_llm: StubLLM) -> None:
    env = cli_env(tmp_path, RLMQ_LM_API_BASE=stub_llm.api_base, OPENAI_API_KEY="stub-key", **WORKER_ENV)
    up, url = start_up(env, tmp_path)
    try:
        r = redis.Redis.from_url(url)
        stub_llm.latency = 0.2
        run_id, _ = submit(r, stub_llm, ["print(items)", batch_step(30, then="import time\ntime.sleep(2)"),
                                         "SUBMIT(answers=answers)"], tag="up-redis")
        wait_until(lambda: sub_requests(stub_llm) >= 4, 90, "the batch under way")
        os.kill(redis_pid(int(url.rsplit(":", 1)[1].split("/")[0])), signal.SIGTERM)
        time.sleep(1.0)
        client = Client(url)
        assert wait_until(lambda: _visible(client, run_id), 30, "run visible again after the restart")
        try:
            record = wait_status(r, run_id, timeout=120)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nrlmq up alive: {up.poll() is None}\n{up_log(tmp_path)}") from None
        print(f"\nMEASURED rlmq up Redis stopped mid-batch: run {record.status.value}, attempt {record.attempt}")
        assert record.status is RunStatus.SUCCEEDED, (record.error, record.error_detail)
        assert up.poll() is None, "rlmq up stopped"
    finally:
        stop_up(up)
    # the whole stack again, on the same state directory: the run and its result are still there
    up, url = start_up(env, tmp_path)
    try:
        result = Client(url).result(run_id)
        assert result["outputs"]["answers"] == [f"answer-{i}" for i in range(30)]
    finally:
        stop_up(up)


def _visible(client: Client, run_id: str):
    try:
        return client.status(run_id)
    except Exception:
        return None
