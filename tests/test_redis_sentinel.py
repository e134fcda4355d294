"""Redis Sentinel for every rlmq Redis client: ``REDIS_URL=sentinel://…?master_name=…`` (Celery's form plus
two query arguments) reaches the primary from the client, the CLI, the workers (broker, result backend,
caches, limiter, records) and keeps working when the Sentinels promote a replica mid-run.

Real parts: redis-server primary and replica and three ``redis-server --sentinel`` on loopback, real
Celery workers, the stub LLM through the real LM path.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry
from redis.sentinel import SentinelConnectionPool

from rlmq.celery_config import CELERY_CONFIG, OUTAGE_RETRY_POLICY
from rlmq.client import Client
from rlmq.redis_url import SentinelURL, celery_settings, connect, unauthenticated_redis_problem
from rlmq.settings import Settings, SettingsError
from rlmq.store.records import RunStatus
from tests.support.cli import cli_env, rlmq
from tests.support.fleet import Fleet, thread_stacks
from tests.support.sentinel_local import LoopbackSentinel
from tests.support.stub_llm import ScriptedRoot, StubLLM, route
from tests.support.wait import wait_until

CELERY_FORM = "sentinel://:pw@h1:26379;sentinel://h2:26380;sentinel://h3/2"


def test_the_url_is_celerys_form_with_the_master_name() -> None:
    parsed = SentinelURL.parse(CELERY_FORM + "?master_name=rlmq&sentinel_password=sp")
    assert parsed.sentinels == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert (parsed.master_name, parsed.db, parsed.password, parsed.sentinel_password) == ("rlmq", 2, "pw", "sp")
    celery = celery_settings(CELERY_FORM + "?master_name=rlmq&sentinel_password=sp")
    # every part names the password and the database: kombu uses the part it is on, which changes at a failover
    assert celery["broker_url"] == celery["result_backend"] == (
        "sentinel://:pw@h1:26379/2;sentinel://:pw@h2:26380/2;sentinel://:pw@h3:26379/2")
    assert celery["broker_transport_options"]["master_name"] == "rlmq"
    assert celery["broker_transport_options"]["sentinel_kwargs"]["password"] == "sp"
    # rlmq's own options stay: a publish on a connection to a lost primary times out instead of waiting forever
    assert celery["broker_transport_options"]["socket_timeout"] == CELERY_CONFIG["broker_transport_options"][
        "socket_timeout"] and "visibility_timeout" in celery["broker_transport_options"]
    assert celery["result_backend_transport_options"]["retry_policy"] == OUTAGE_RETRY_POLICY


def test_kombu_and_celery_keep_the_database_and_password_through_a_failover() -> None:
    """kombu moves to the next part of the URL at each failed reconnect: every part must name the same
    database, or a failover leaves a fleet's processes on different ones (issue #19)."""
    from celery import Celery
    from kombu import Connection

    celery = celery_settings(CELERY_FORM + "?master_name=rlmq")
    broker = Connection(celery["broker_url"], transport_options=celery["broker_transport_options"])
    for _ in range(4):
        assert (broker.virtual_host, broker.password) == ("2", "pw")
        broker.maybe_switch_next()
    app = Celery("sentinel-url-check", set_as_current=False)
    app.conf.update(celery)
    assert (app.backend.connparams["db"], app.backend.connparams["password"]) == (2, "pw")


@pytest.mark.parametrize(("url", "error"), [
    (CELERY_FORM, "needs ?master_name=NAME"),
    (CELERY_FORM + "?master_name=r&colour=blue", "unknown argument(s) colour"),
    ("sentinel://h1:26379;redis://h2:6379/0?master_name=r", "must be sentinel://host:port"),
    ("sentinel://h1:26379/zero?master_name=r", "must be a number"),
])
def test_a_bad_sentinel_url_is_one_line_naming_the_problem(url: str, error: str) -> None:
    with pytest.raises(SettingsError, match=r"REDIS_URL") as caught:
        Settings.from_env({"REDIS_URL": url, "RLMQ_LM": "openai/x", "OPENAI_API_KEY": "k"})
    assert error in str(caught.value) and "\n" not in str(caught.value)


def test_remote_sentinels_without_the_redis_password_are_refused() -> None:
    assert "without the Redis password" in (unauthenticated_redis_problem(
        "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0?master_name=r") or "")
    assert unauthenticated_redis_problem(CELERY_FORM + "?master_name=r") is None
    assert unauthenticated_redis_problem("sentinel://127.0.0.1:26379/0?master_name=r") is None


@pytest.fixture(scope="module")
def sentinel() -> Iterator[LoopbackSentinel]:
    with LoopbackSentinel() as deployment:
        yield deployment


@pytest.mark.slow
def test_a_client_follows_the_primary_through_a_failover(sentinel: LoopbackSentinel) -> None:
    client = connect(sentinel.url(db=1), socket_timeout=5)
    key = f"probe-{uuid.uuid4().hex}"
    client.set(key, "before")
    old = sentinel.primary_port()
    assert sentinel.failover() != old
    # the same client object: its pool asks the Sentinels again once the old primary refuses writes
    wait_until(lambda: _set(client, key, "after"), 30, "a write on the new primary")
    assert client.get(key) == b"after"
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.get_master_address()[1] == sentinel.primary_port()


@pytest.mark.slow
def test_a_command_in_flight_when_the_primary_dies_is_answered_by_the_new_primary() -> None:
    """A worker's client retries a command whose connection the dying primary closed: the retry must
    find the promoted replica through the Sentinels, not dial the dead address until its retries run
    out (redis-py 8.1 did: a run stalled two minutes after a failover)."""
    with LoopbackSentinel() as group:
        url = group.url(db=3)
        retry = Retry(ConstantBackoff(0.5), 40)  # 20 s of retries: far longer than the failover
        client = connect(url, socket_timeout=30, retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        key = f"wake-{uuid.uuid4().hex}"
        got: list[object] = []

        def wait() -> None:
            try:
                got.append(client.blpop([key], timeout=25))
            except redis.RedisError as exc:
                got.append(exc)

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        primary = redis.Redis(port=group.primary_port(), password=group.password)
        wait_until(lambda: int(primary.info("clients")["blocked_clients"]) > 0, 10, "the BLPOP blocked on the primary")
        group.kill_primary()
        connect(url, socket_timeout=5).rpush(key, "woken")  # on the promoted replica
        thread.join(40)
        assert got == [(key.encode(), b"woken")]


def _set(client: redis.Redis, key: str, value: str) -> bool:
    try:
        return bool(client.set(key, value))
    except redis.RedisError:  # the old primary refusing (READONLY) or gone, until the pool asks the Sentinels again
        return False


@pytest.mark.slow
def test_a_fleet_on_sentinel_finishes_a_run_when_the_primary_dies(tmp_path) -> None:
    """The primary is SIGKILLed mid-run: the Sentinels promote the replica within seconds, and every
    worker, the client and the CLI carry on against it without a restart."""
    with LoopbackSentinel() as sentinel:
        _run_across_the_loss_of_the_primary(sentinel, tmp_path)


def _run_across_the_loss_of_the_primary(sentinel: LoopbackSentinel, tmp_path: Path) -> None:
    url = sentinel.url(db=2)
    nonce = uuid.uuid4().hex[:8]
    steps = ["out = llm_query_batched([f'a{i} " + nonce + "' for i in range(20)])\nprint(len(out))",
             "import time\ntime.sleep(4)\nprint('slept')",
             "out2 = llm_query_batched([f'b{i} " + nonce + "' for i in range(20)])\nprint(len(out2))",
             "SUBMIT(answers=out[:2] + out2[:2])"]
    with StubLLM() as stub, Fleet(url, {"RLMQ_LM": "openai/sentinel-root", "OPENAI_API_KEY": "stub-key",
                                        "RLMQ_LM_API_BASE": stub.api_base}) as fleet:
        script = ScriptedRoot(steps)
        stub.set_responder(route(root=script, sub=lambda prompt: "ok:" + prompt.split()[0]))
        fleet.start("rlm", name="srlm", concurrency=1, wait=False)
        fleet.start("llm", name="sllm", concurrency=8, wait=False)
        fleet.wait_ready(timeout=120)
        client = Client(url)
        run_id = client.submit("items: list[str] -> answers: list[str]", {"items": ["x"]}, max_iters=6)
        wait_until(lambda: client.status(run_id).progress.iteration >= 2, 120, "the run in its sleeping step")
        old = sentinel.primary_port()
        assert sentinel.kill_primary() != old
        try:
            record = client.wait(run_id, timeout=60)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{thread_stacks(fleet.stack.children)}") from None
        assert record.status is RunStatus.SUCCEEDED, (record.status, record.error)
        assert client.result(run_id)["outputs"]["answers"] == ["ok:a0", "ok:a1", "ok:b0", "ok:b1"]
        done = rlmq("status", run_id, env=cli_env(tmp_path, REDIS_URL=url), cwd=tmp_path)
        assert done.code == 0 and "succeeded" in done.stdout.lower(), (done.stdout, done.stderr)
        assert not fleet.stack.dead_children(), "a worker died across the failover"


@pytest.mark.slow
def test_a_worker_client_asks_the_sentinels_again_when_a_command_reconnects() -> None:
    """The workers' client retries a command for about two minutes (``OUTAGE_RETRY``). redis-py reconnects a
    dropped connection from the command with that same policy, to the address it had: without
    ``rlmq.sentinel_connection`` a command that lost a primary which stopped answering (a lost host: no
    RST, connects that hang) dialled it for minutes after the Sentinels had promoted the replica (issue
    #19's host tests saw a run's claim renewal stall so). SIGSTOP plays the lost host here."""
    import signal
    import threading

    from workers.context import OUTAGE_RETRY

    with LoopbackSentinel() as sentinel:
        client = connect(sentinel.url(db=3), retry=OUTAGE_RETRY, retry_on_error=[redis.ConnectionError,
                                                                                 redis.TimeoutError], socket_timeout=2)
        client.set("before", "1")
        # on the replica too (replication is asynchronous; the replica may still be syncing)
        wait_until(lambda: client.wait(1, 500) == 1, 30, "the replica acknowledging the write")
        old = sentinel.primary_port()
        primary = next(server for server in sentinel.servers if server.port == old).process
        primary.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: sentinel.primary_port() != old, 60, "the Sentinels promoting the replica", 0.5)
            done = threading.Event()
            outcome: list[object] = []

            def write() -> None:
                try:
                    outcome.append(client.set("after", "2"))
                except redis.RedisError as exc:
                    outcome.append(exc)
                done.set()

            threading.Thread(target=write, daemon=True).start()
            # a correctness bound, not a speed one: without the fix the write dials the old primary for minutes
            assert done.wait(30), "the write still dials the lost primary after 30 s"
            assert outcome == [True] and client.get("before") == b"1"
        finally:
            primary.send_signal(signal.SIGCONT)
            client.close()
