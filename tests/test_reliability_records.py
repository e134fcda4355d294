"""The run's claim, fencing and recovery scripts on a real Redis: a superseded attempt can write
nothing, a run whose claim lapsed is restarted as the next attempt, and the last attempt FAILS
with the reason; ``rlmq status`` shows the attempt and why it restarted. Repeating a write whose
reply was lost (what redis-py's retry does) answers as the first time."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from rlmq.celery_config import RLM_QUEUE, client_app
from rlmq.progress import format_progress
from rlmq.run_send import send_run_task
from rlmq.store import keys
from rlmq.store.keys import inflight_key
from rlmq.store.records import Progress, RunSandbox, RunSpec, RunStatus, RunStore, new_run_id
from tests.support.records import stored_record
from workers.claim import Recovery, RunClaim, recover
from workers.context import redis_client
from workers.recovery import resend_queued
from workers.single_flight import ResponseCache


def queued(r: redis.Redis) -> tuple[RunStore, str]:
    store = RunStore(r)
    spec = RunSpec(run_id=new_run_id(), signature="a -> b", inputs={})
    store.create(spec)
    return store, spec.run_id


def claim(r: redis.Redis, run_id: str, worker: str) -> RunClaim:
    return RunClaim(r, run_id, worker=worker, ttl_seconds=30)


def sweep(r: redis.Redis, run_id: str, *, max_attempts: int = 3) -> Recovery:
    return recover(r, run_id, max_attempts=max_attempts, lease_seconds=30)


def lapse(r: redis.Redis, run_id: str) -> None:
    r.delete(f"rlmq:run:{run_id}:owner")  # what a dead owner's expired claim looks like


def test_claim_runs_a_queued_run_once(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    first = claim(redis_client, run_id, "w1")
    assert first.take() == 1
    assert first.take() == 1  # the same execution asking again (a retried call whose reply was lost)
    assert claim(redis_client, run_id, "w1").take() == 0  # a duplicate delivery, even to the same worker
    assert claim(redis_client, run_id, "w2").take() == 0
    record = stored_record(redis_client, run_id)
    assert record.status is RunStatus.RUNNING and record.worker == "w1" and record.attempt == 1
    assert store.active() == [run_id]


def test_recovery_restarts_then_fences_the_old_attempt(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    old = claim(redis_client, run_id, "w1")
    assert old.take() == 1
    assert sweep(redis_client, run_id) is Recovery.NOTHING  # owner alive
    lapse(redis_client, run_id)
    assert sweep(redis_client, run_id) is Recovery.RESTART
    assert sweep(redis_client, run_id) is Recovery.NOTHING  # once only
    record = stored_record(redis_client, run_id)
    assert record.status is RunStatus.QUEUED and record.attempt == 2
    assert record.restart_reason is not None and "worker w1 stopped heartbeating" in record.restart_reason
    new = claim(redis_client, run_id, "w2")
    assert new.take() == 2
    # the old owner comes back: every write of attempt 1 is refused, and it learns it must stop
    assert not old.renew() and old.fenced.is_set()
    assert not old.write_progress(Progress(iteration=9))
    assert not store.finish(run_id, RunStatus.SUCCEEDED, result={"stale": True}, attempt=1)
    assert new.renew() and not new.fenced.is_set()
    assert new.write_progress(Progress(iteration=1))
    assert store.finish(run_id, RunStatus.SUCCEEDED, result={"fresh": True}, attempt=2)
    assert store.result(run_id) == {"fresh": True} and stored_record(redis_client, run_id).progress == Progress(iteration=1)
    assert store.active() == [] and redis_client.get(f"rlmq:run:{run_id}:owner") is None
    assert "attempt 2 (restarted: worker w1 stopped heartbeating" in format_progress(stored_record(redis_client, run_id))


def test_the_final_write_is_idempotent_for_its_attempt(redis_client: redis.Redis) -> None:
    """A retried final write whose first try landed (its reply was lost) is acknowledged, not refused;
    a different ending, another attempt's, or a second cancel is still refused."""
    store, run_id = queued(redis_client)
    assert claim(redis_client, run_id, "w1").take() == 1
    assert store.finish(run_id, RunStatus.FAILED, error="boom", attempt=1)
    assert store.finish(run_id, RunStatus.FAILED, error="boom", attempt=1)
    assert not store.finish(run_id, RunStatus.SUCCEEDED, result={"late": True}, attempt=1)
    assert not store.finish(run_id, RunStatus.FAILED, error="boom", attempt=2)
    assert not store.finish(run_id, RunStatus.FAILED, error="boom")  # no attempt: no idempotent answer
    record = stored_record(redis_client, run_id)
    assert record.status is RunStatus.FAILED and record.error == "boom" and store.result(run_id) is None


def test_text_and_documents_pass_through_the_scripts_unchanged(redis_client: redis.Redis) -> None:
    """Named arguments are one JSON object decoded by cjson; documents go as they are."""
    store, run_id = queued(redis_client)
    run = claim(redis_client, run_id, "wörker-🦀")
    assert run.take() == 1
    note = 'quote " backslash \\ newline \n émoji 🦀 \u2028'
    progress = Progress(iteration=12345678901234567, sandbox=RunSandbox(backend="local", id=note, isolation="vm"))
    assert run.write_progress(progress)
    assert stored_record(redis_client, run_id).progress == progress
    error = 'line 1\n"line 2" 🦀'
    assert store.finish(run_id, RunStatus.FAILED, error=error, error_detail=error * 3, progress=progress, attempt=1)
    record = stored_record(redis_client, run_id)
    assert (record.worker, record.error, record.error_detail, record.progress) == ("wörker-🦀", error, error * 3,
                                                                                  progress)


def test_a_cancelled_run_whose_owner_died_ends_cancelled(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    claim(redis_client, run_id, "w1").take()
    store.request_cancel(run_id)
    lapse(redis_client, run_id)
    assert sweep(redis_client, run_id) is Recovery.CANCELLED
    assert store.status(run_id) is RunStatus.CANCELLED and store.active() == []


def test_a_lapsed_claim_is_retaken_while_nobody_took_over(redis_client: redis.Redis) -> None:
    _, run_id = queued(redis_client)
    run = claim(redis_client, run_id, "w1")
    run.take()
    lapse(redis_client, run_id)  # e.g. a long GC pause or a Redis restart, but no sweep ran yet
    assert run.renew()
    assert sweep(redis_client, run_id) is Recovery.NOTHING


def test_a_stopping_worker_lets_its_claim_lapse_at_once(redis_client: redis.Redis) -> None:
    _, run_id = queued(redis_client)
    run = claim(redis_client, run_id, "w1")
    run.take()
    run.lapse()
    time.sleep(0.01)
    assert sweep(redis_client, run_id) is Recovery.RESTART


def test_a_hand_back_requeues_at_once_and_is_not_charged_as_an_attempt(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    stopping = claim(redis_client, run_id, "w1")
    stopping.take()
    assert claim(redis_client, run_id, "w9").hand_back("not mine") is False  # only the owner hands back
    assert stopping.hand_back("handed back: worker w1 is shutting down") is True
    assert stopping.fenced.is_set() and not stopping.renew()  # the stopping attempt writes nothing more
    record = stored_record(redis_client, run_id)
    assert record.status is RunStatus.QUEUED and record.attempt == 2 and store.active() == [run_id]
    assert record.restarts[-1]["handback"] and record.restart_reason == "handed back: worker w1 is shutting down"
    assert stopping.hand_back("again") is False  # a repeated hand-back cannot requeue it twice
    # The next attempt dies: with max_attempts=2 it is restarted, not failed (the hand-back was no failure).
    assert claim(redis_client, run_id, "w2").take() == 2
    lapse(redis_client, run_id)
    assert sweep(redis_client, run_id, max_attempts=2) is Recovery.RESTART
    assert claim(redis_client, run_id, "w3").take() == 3
    lapse(redis_client, run_id)
    assert sweep(redis_client, run_id, max_attempts=2) is Recovery.FAILED


def test_last_attempt_fails_with_the_reason(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    for attempt in (1, 2):
        assert claim(redis_client, run_id, f"w{attempt}").take() == attempt
        lapse(redis_client, run_id)
        assert sweep(redis_client, run_id, max_attempts=2) is (Recovery.RESTART if attempt == 1 else Recovery.FAILED)
    record = stored_record(redis_client, run_id)
    assert record.status is RunStatus.FAILED and record.attempt == 2 and len(record.restarts) == 2
    assert record.error is not None and record.error.startswith("gave up after 2 attempt(s): worker w2 stopped heartbeating")
    assert store.active() == []


def queued_messages(r: redis.Redis) -> list[str]:
    """The run ids of the ``run_rlm`` messages waiting in the rlm queue (as kombu stores them)."""
    return [json.loads(raw)["headers"]["id"] for raw in r.lrange(RLM_QUEUE, 0, -1)]


def test_a_queued_run_whose_message_was_lost_is_sent_again_once(redis_url: str, redis_client: redis.Redis) -> None:
    """A fresh run whose message vanished (a worker acked it and died before claiming, a consumer's
    connection broke after its BRPOP, a failover lost it) is sent again once it is stale, by one sweeper."""
    app = client_app(redis_url)
    _, run_id = queued(redis_client)
    assert resend_queued(redis_client, app, stale_after=0.3) == 0  # just sent: its message may be on its way
    time.sleep(0.4)
    assert [resend_queued(redis_client, app, stale_after=0.3) for _ in range(3)] == [1, 0, 0]
    assert queued_messages(redis_client) == [run_id]  # sent once, by one of the sweeps
    redis_client.delete(RLM_QUEUE)  # a worker takes the message...
    assert claim(redis_client, run_id, "w1").take() == 1  # ...and claims the run: it leaves the index
    time.sleep(0.4)
    assert resend_queued(redis_client, app, stale_after=0.3) == 0 and queued_messages(redis_client) == []
    assert redis_client.zcard(keys.runs_queued_key()) == 0


def test_a_stale_queued_run_waits_while_messages_are_queued(redis_url: str, redis_client: redis.Redis) -> None:
    """In a backlog a stale run's message is likely among those waiting: nothing is sent until the queue drains."""
    app = client_app(redis_url)
    _, run_id = queued(redis_client)
    _, behind = queued(redis_client)
    send_run_task(app, behind)  # its message waits (no worker), run_id's was lost
    time.sleep(0.4)
    assert resend_queued(redis_client, app, stale_after=0.3) == 0 and queued_messages(redis_client) == [behind]
    redis_client.delete(RLM_QUEUE)
    assert resend_queued(redis_client, app, stale_after=0.3) == 2
    assert sorted(queued_messages(redis_client)) == sorted([run_id, behind])


def scripts_called(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha"))


def test_a_backlog_runs_no_script_per_stale_run(redis_url: str, redis_client: redis.Redis) -> None:
    """While messages wait, a sweep looks at no stale run (a script each was the cost of a backlog); a run
    cancelled while queued stays in the index until the queue drains, then the first sweep prunes it."""
    app = client_app(redis_url)
    stale = [queued(redis_client)[1] for _ in range(20)]
    store, cancelled = queued(redis_client)
    assert store.finish(cancelled, RunStatus.CANCELLED, error="cancelled before it started", expect=RunStatus.QUEUED)
    send_run_task(app, stale[0])  # a backlog of one
    time.sleep(0.4)
    before = scripts_called(redis_client)
    assert resend_queued(redis_client, app, stale_after=0.3) == 0
    assert scripts_called(redis_client) == before
    assert redis_client.zscore(keys.runs_queued_key(), cancelled) is not None
    redis_client.delete(RLM_QUEUE)
    assert resend_queued(redis_client, app, stale_after=0.3) == len(stale)
    assert redis_client.zscore(keys.runs_queued_key(), cancelled) is None


def test_a_restarted_or_handed_back_run_never_claimed_is_sent_again(redis_url: str, redis_client: redis.Redis) -> None:
    app = client_app(redis_url)
    _, run_id = queued(redis_client)
    first = claim(redis_client, run_id, "w1")
    first.take()
    lapse(redis_client, run_id)
    assert sweep(redis_client, run_id) is Recovery.RESTART
    assert sweep(redis_client, run_id) is Recovery.NOTHING  # QUEUED: recovery leaves it to the resend
    time.sleep(0.4)
    assert resend_queued(redis_client, app, stale_after=0.3) == 1 and queued_messages(redis_client) == [run_id]
    redis_client.delete(RLM_QUEUE)
    second = claim(redis_client, run_id, "w2")
    assert second.take() == 2 and second.hand_back("worker w2 is shutting down")
    time.sleep(0.4)
    assert resend_queued(redis_client, app, stale_after=0.3) == 1 and queued_messages(redis_client) == [run_id]


def test_a_run_cancelled_while_queued_leaves_the_index(redis_url: str, redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    assert store.finish(run_id, RunStatus.CANCELLED, error="cancelled before it started", expect=RunStatus.QUEUED)
    time.sleep(0.4)
    assert resend_queued(redis_client, client_app(redis_url), stale_after=0.3) == 0
    assert redis_client.zcard(keys.runs_queued_key()) == 0 and queued_messages(redis_client) == []


def test_cancel_of_a_queued_run_does_not_overwrite_a_claimed_one(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    claim(redis_client, run_id, "w1").take()
    assert not store.finish(run_id, RunStatus.CANCELLED, error="cancelled before it started", expect=RunStatus.QUEUED)
    assert store.status(run_id) is RunStatus.RUNNING


@pytest.mark.slow
def test_a_waiter_outwaits_a_dead_leaders_lock_on_the_workers_client(redis_url: str) -> None:
    """The workers' shared client retries what fails; its socket timeout must outlast a single-flight
    waiter's BLPOP (up to a lock's lease), or the wait itself would fail and be retried for minutes."""
    cache = ResponseCache(redis_client(redis_url), ttl_seconds=60)
    key = "d" * 64
    cache.redis.set(inflight_key(key), "a-dead-leader", px=7000)  # over redis-py 8's 5-s default socket timeout
    done: list[tuple[dict, bool]] = []
    started = time.monotonic()
    waiter = threading.Thread(target=lambda: done.append(
        cache.single_flight(key, lambda: {"text": "mine"}, lock_ttl=5, wait_timeout=30)), daemon=True)
    waiter.start()
    waiter.join(20)
    assert done == [({"text": "mine"}, False)], "the waiter did not take over once the dead leader's lock expired"
    assert 6.5 < time.monotonic() - started < 12
