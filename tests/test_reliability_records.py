"""The run record's fencing and recovery scripts on a real Redis: a superseded attempt can write
nothing, a run whose claim lapsed is restarted as the next attempt, and the last attempt FAILS
with the reason; ``rlmq status`` shows the attempt and why it restarted."""

from __future__ import annotations

import time

import redis

from rlmq.progress import format_progress
from rlmq.store.records import Progress, RunSpec, RunStatus, RunStore, new_run_id


def queued(r: redis.Redis) -> tuple[RunStore, str]:
    store = RunStore(r)
    spec = RunSpec(run_id=new_run_id(), signature="a -> b", inputs={})
    store.create(spec)
    return store, spec.run_id


def lapse(r: redis.Redis, run_id: str) -> None:
    r.delete(f"rlmq:run:{run_id}:owner")  # what a dead owner's expired claim looks like


def test_claim_runs_a_queued_run_once(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    assert store.claim(run_id, "w1/1", 30, worker="w1") == 1
    assert store.claim(run_id, "w2/1", 30, worker="w2") == 0  # a duplicate delivery
    record = store.get(run_id)
    assert record.status is RunStatus.RUNNING and record.worker == "w1" and record.attempt == 1
    assert store.active() == [run_id]


def test_recovery_restarts_then_fences_the_old_attempt(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    assert store.claim(run_id, "w1/1", 30, worker="w1") == 1
    assert store.recover(run_id, max_attempts=3, lease_seconds=30, resend_after=300) == ""  # owner alive
    lapse(redis_client, run_id)
    assert store.recover(run_id, max_attempts=3, lease_seconds=30, resend_after=300) == "restart"
    assert store.recover(run_id, max_attempts=3, lease_seconds=30, resend_after=300) == ""  # once only
    record = store.get(run_id)
    assert record.status is RunStatus.QUEUED and record.attempt == 2
    assert "worker w1 stopped heartbeating" in record.restart_reason
    assert store.claim(run_id, "w2/1", 30, worker="w2") == 2
    # the old owner comes back: every write of attempt 1 is refused, and it learns it must stop
    assert not store.renew_claim(run_id, 1, "w1/1", 30)
    assert not store.set_progress(run_id, Progress(iteration=9), attempt=1)
    assert not store.finish(run_id, RunStatus.SUCCEEDED, result={"stale": True}, attempt=1)
    assert store.renew_claim(run_id, 2, "w2/1", 30)
    assert store.set_progress(run_id, Progress(iteration=1), attempt=2)
    assert store.finish(run_id, RunStatus.SUCCEEDED, result={"fresh": True}, attempt=2)
    assert store.result(run_id) == {"fresh": True} and store.get(run_id).progress == Progress(iteration=1)
    assert store.active() == []
    assert "attempt 2 (restarted: worker w1 stopped heartbeating" in format_progress(store.get(run_id))


def test_a_cancelled_run_whose_owner_died_ends_cancelled(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    store.claim(run_id, "w1/1", 30, worker="w1")
    store.request_cancel(run_id)
    lapse(redis_client, run_id)
    assert store.recover(run_id, max_attempts=3, lease_seconds=30, resend_after=300) == "cancelled"
    assert store.status(run_id) is RunStatus.CANCELLED and store.active() == []


def test_a_lapsed_claim_is_retaken_while_nobody_took_over(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    store.claim(run_id, "w1/1", 30, worker="w1")
    lapse(redis_client, run_id)  # e.g. a long GC pause or a Redis restart, but no sweep ran yet
    assert store.renew_claim(run_id, 1, "w1/1", 30)
    assert store.recover(run_id, max_attempts=3, lease_seconds=30, resend_after=300) == ""


def test_last_attempt_fails_with_the_reason(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    for attempt in (1, 2):
        assert store.claim(run_id, f"w{attempt}/1", 30, worker=f"w{attempt}") == attempt
        lapse(redis_client, run_id)
        assert store.recover(run_id, max_attempts=2, lease_seconds=30, resend_after=300) == (
            "restart" if attempt == 1 else "failed")
    record = store.get(run_id)
    assert record.status is RunStatus.FAILED and record.attempt == 2 and len(record.restarts) == 2
    assert record.error.startswith("gave up after 2 attempt(s): worker w2 stopped heartbeating")
    assert store.active() == []


def test_a_restarted_run_never_claimed_is_sent_again(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    store.claim(run_id, "w1/1", 30, worker="w1")
    lapse(redis_client, run_id)
    assert store.recover(run_id, max_attempts=3, lease_seconds=30, resend_after=0.2) == "restart"
    assert store.recover(run_id, max_attempts=3, lease_seconds=30, resend_after=0.2) == ""
    time.sleep(0.3)
    assert store.recover(run_id, max_attempts=3, lease_seconds=30, resend_after=0.2) == "resend"


def test_cancel_of_a_queued_run_does_not_overwrite_a_claimed_one(redis_client: redis.Redis) -> None:
    store, run_id = queued(redis_client)
    store.claim(run_id, "w1/1", 30, worker="w1")
    assert not store.finish(run_id, RunStatus.CANCELLED, error="cancelled before it started", expect=RunStatus.QUEUED)
    assert store.status(run_id) is RunStatus.RUNNING
