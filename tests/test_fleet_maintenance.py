"""Worker start checks and sandbox lease reaping, on real processes and a real local sandbox."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import redis

from broker_bridge import BackendName, SandboxDied, SandboxInfo, interpreter_factory
from rlmq.store import keys
from tests.support.fleet import REPO_ROOT
from workers.liveness import Heartbeat
from workers.sandbox_registry import LeaseRegistry, SandboxLease, reap_expired
from workers.ticker import Ticker

BAD_SETTINGS = [  # (environment, queue arguments, a fragment of the one-line error)
    ({"REDIS_URL": "redis://127.0.0.1:1/0"}, ("-Q", "llm"), "RLMQ_LM is not set"),
    ({"RLMQ_LM": "openai/x"}, ("-Q", "rlm"), "REDIS_URL is not set"),
    ({"REDIS_URL": "redis://127.0.0.1:1/0", "RLMQ_LM": "openai/x", "RLMQ_MAX_ITERS": "many"}, ("-Q", "rlm"),
     "RLMQ_MAX_ITERS='many' is not a number"),
    ({"REDIS_URL": "redis://127.0.0.1:1/0", "RLMQ_LM": "openai/x"}, ("-Q", "rlm,llm"), "must not consume both"),
    ({"REDIS_URL": "redis://127.0.0.1:1/0", "RLMQ_LM": "openai/x"}, (), "pass -Q rlm"),
    ({"REDIS_URL": "redis://redis.example.com:6379/0", "RLMQ_LM": "openai/x"}, ("-Q", "llm"),
     "REDIS_URL points at redis.example.com without a password"),
]


def start_worker(env_overrides: dict[str, str], *queue_args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLMQ_", "REDIS_URL"))}
    env.update(env_overrides)
    env["PYTHONPATH"] = str(REPO_ROOT)
    cmd = [sys.executable, "-m", "celery", "-A", "tasks", "worker", *queue_args, "-P", "solo", "--without-mingle"]
    return subprocess.Popen(cmd, cwd="/tmp", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def badly_set_workers() -> list[tuple[int, str, str]]:
    """Every case's worker, started at once (each imports the tasks first, ~2 s): (exit code, stdout, stderr)."""
    workers = [start_worker(env, *args) for env, args, _ in BAD_SETTINGS]
    ended = []
    for worker in workers:
        try:
            out, err = worker.communicate(timeout=60)
        finally:
            worker.kill()
        ended.append((worker.returncode, out, err))
    return ended


@pytest.mark.parametrize("case", range(len(BAD_SETTINGS)), ids=[expect for *_, expect in BAD_SETTINGS])
def test_bad_worker_settings_stop_it_with_one_line(case: int, badly_set_workers) -> None:
    expect = BAD_SETTINGS[case][2]
    returncode, stdout, stderr = badly_set_workers[case]
    assert returncode != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlmq worker: ") and expect in lines[0], stderr
    assert "Traceback" not in stderr + stdout


def test_result_expires_reaches_celerys_result_backend(redis_url: str, redis_client: redis.Redis) -> None:
    """RLMQ_RESULT_EXPIRES is how long Celery keeps a task's state, as it is for the run's record."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLMQ_", "REDIS_URL"))}
    env.update(REDIS_URL=redis_url, RLMQ_LM="openai/x", RLMQ_RESULT_EXPIRES="1234", PYTHONPATH=str(REPO_ROOT))
    probe = "from tasks.app import app\napp.backend.store_result('expiry-probe', {'x': 1}, 'SUCCESS')"
    done = subprocess.run([sys.executable, "-c", probe], cwd="/tmp", env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert 1200 < redis_client.ttl("celery-task-meta-expiry-probe") <= 1234


def test_a_slow_sweep_does_not_delay_the_heartbeat(redis_client: redis.Redis) -> None:
    """The maintenance sweep has its own thread (tasks.watchdog): a sweep stuck for a while (Daytona
    deletes with retries) must not let the worker's heartbeat expire."""
    beat = Heartbeat(redis_client, "slow-sweeper", ttl_seconds=0.4).start()
    sweeps: list[float] = []

    def stuck_sweep() -> None:
        sweeps.append(time.monotonic())
        time.sleep(1.5)

    sweeper = Ticker("slow-sweep", 0.05, stuck_sweep).start()
    try:
        time.sleep(0.2)
        seen = set()
        while len(sweeps) < 1 or time.monotonic() - sweeps[0] < 1.2:  # inside the first, stuck sweep
            value = redis_client.get(keys.worker_heartbeat_key("slow-sweeper"))
            assert value is not None, "the heartbeat expired while the sweep was stuck"
            seen.add(value)
            time.sleep(0.05)
        assert len(seen) >= 5  # it kept beating (every 0.1 s) meanwhile
    finally:
        sweeper.stop(timeout=0)
        beat.stop()


def test_reaper_destroys_expired_local_sandboxes_only(redis_client: redis.Redis) -> None:
    registry = LeaseRegistry(redis_client, ttl_seconds=0.5)
    created: list[SandboxInfo] = []
    factory = interpreter_factory("local", labels={"rlmq.run": "r1"}, on_sandbox_created=created.append)
    interp = factory()
    try:
        interp.start()
        assert interp.execute("print(6 * 7)").strip() == "42"
        (info,) = created
        registry.register(info, run_id="r1", owner="test")
        # a lease of a local sandbox on another host, and one not yet expired
        other = SandboxLease("local", "elsewhere-1", "another-host", "r2", "w", time.time() - 5)
        redis_client.set(keys.lease_key(other.sandbox_id), other.to_json())
        redis_client.zadd(keys.leases_index_key(), {other.sandbox_id: other.expires_at})
        LeaseRegistry(redis_client, 60).register(
            SandboxInfo(backend=BackendName.LOCAL, sandbox_id="fresh-1", labels={}, host=socket.gethostname()),
            run_id="r3", owner="w")
        assert reap_expired(redis_client, time.time()) == []  # nothing expired yet on this host
        time.sleep(0.6)
        reaped = reap_expired(redis_client, time.time())
        assert [lease.sandbox_id for lease in reaped] == [info.sandbox_id]
        assert sorted(registry.live()) == ["elsewhere-1", "fresh-1"]
        with pytest.raises(SandboxDied):
            interp.execute("print('still alive?')")
    finally:
        interp.shutdown()
