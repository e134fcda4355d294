"""Maintenance of the fleet, run by every rlm worker (and beat, where deployed): sandboxes whose lease
expired are destroyed, runs whose worker died are started again elsewhere, and corpus jobs are fed
(``workers.job_feeder``: their ended runs settled, their next ones started, should every other feeder
have missed them).

``maintain`` runs in every rlm worker's main process every ``RLMQ_MAINTENANCE_INTERVAL`` seconds, on
its own thread (``tasks.watchdog``), and in beat's ``reap_leases`` where beat is deployed: nothing
depends on beat.

For each active run, ``workers.claim.recover`` decides (:class:`~workers.claim.Recovery`); the dead
attempt's sandboxes are deleted by their labels (``reap_attempt``: also those no lease names, such as
one whose create completed after its worker died); a restarted run is sent again (the run id stays
the task id) and recorded in Celery's own terms (state RETRY, a ``task-retried`` event; FAILURE or
REVOKED for a run that ends here), so ``AsyncResult`` and Flower show it waiting, not lost. Any
number of workers may sweep at once: exactly one restarts a given run.

A sweep never waits out a Redis outage (its client fails fast): a command held back until Redis
returns could restart runs whose owners have not yet re-taken their lapsed claims. The next sweep is
its retry, after the grace below.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from rlmq.celery_config import RLM_QUEUE
from rlmq.run_send import send_run_task
from rlmq.settings import Settings
from rlmq.store import keys, replies
from rlmq.store.records import RunStore
from workers.claim import Recovery, recover, resend_if_lost
from workers.context import redis_client, worker_settings
from workers.job_feeder import feed_jobs
from workers.outcomes import RunFailed, mark_revoked, record_restart
from workers.sandbox_registry import reap_attempt, reap_expired

__all__ = ["RECOVERY_GRACE_SECONDS", "RESEND_AFTER_LEASES", "maintain", "reap_here", "recover_runs", "resend_queued"]

logger = logging.getLogger(__name__)

# A run still QUEUED this many leases after it was sent (submitted, restarted or handed back) while no
# message waits in the rlm queue is sent again (90 s with the default 30-s lease): its message was lost.
# Run workers take no message they cannot start at once (prefetch is disabled) and claim a run first
# thing, so a run QUEUED this long with nothing waiting is not in anyone's hands; three leases leave a
# claim delayed by a Redis stall room, and a lost run waits 90 s, not the 300 s of ten.
# kombu's BRPOP takes a message off the list before the worker reads it, so a consumer whose connection
# then breaks loses it (a Redis failover lost a restarted run's message so, tests/test_hosts_faults.py);
# runs are acked early, so a worker that dies between taking a message and claiming its run loses it too;
# a promoted replica may never have had it. A duplicate delivery is harmless: the claim runs it once.
RESEND_AFTER_LEASES = 3
RESEND_BATCH = 500  # stale runs looked at per sweep


def recover_runs(client: redis.Redis, app: Any, settings: Settings) -> dict[str, int]:
    """Restart (or end) every active run whose claim lapsed; how many of each :class:`Recovery`."""
    store = RunStore(client)
    counts = {action.value: 0 for action in Recovery if action is not Recovery.NOTHING}
    for run_id in store.active():
        action = recover(client, run_id, max_attempts=settings.run_attempts, lease_seconds=settings.lease_ttl)
        if action is Recovery.NOTHING:
            continue
        counts[action.value] += 1
        record = store.get(run_id)
        reason = (record.restart_reason if record else None) or "worker lost"
        if record is not None:  # RESTART made it the next attempt
            reap_attempt(client, run_id, record.attempt - (action is Recovery.RESTART))
        if action in (Recovery.FAILED, Recovery.CANCELLED):
            error = record.error if record and record.error else reason
            logger.error("run %s %s: %s", run_id, action.value.upper(), error)
            _celery_state(app, run_id, action, error)
            continue
        logger.warning("run %s: starting attempt %s (%s)", run_id, record.attempt if record else "?", reason)
        _celery_state(app, run_id, action, reason)
        send_run_task(app, run_id)
    return counts


def resend_queued(client: redis.Redis, app: Any, stale_after: float) -> int:
    """Send ``run_rlm`` again for runs QUEUED longer than ``stale_after`` seconds since they were sent,
    while the rlm queue holds no message (in a backlog a stale run's message is likely among those
    waiting: it is sent again once the queue drains). How many were sent.

    In a backlog it looks at no run at all, so entries of runs that left QUEUED unclaimed (cancelled
    while queued) stay in the index until the queue drains: a backlog has hundreds of stale QUEUED
    runs, and a script per run each sweep only to prune a few ids was the waste."""
    if client.llen(RLM_QUEUE):  # runs are not prefetched: a message taken is a run started
        return 0
    stale_before = time.time() - stale_after
    stale = replies.members(client.zrangebyscore(keys.runs_queued_key(), "-inf", stale_before, 0, RESEND_BATCH))
    sent = 0
    for run_id in stale:
        if resend_if_lost(client, run_id, stale_before=stale_before):
            logger.warning("run %s: still QUEUED %.0f s after it was sent, with no message waiting; sending it "
                           "again", run_id, stale_after)
            send_run_task(app, run_id)
            sent += 1
    return sent


def _celery_state(app: Any, run_id: str, action: Recovery, reason: str) -> None:
    """FAILURE, REVOKED or RETRY (it will run again), as Celery stores them, plus the event Flower shows."""
    if action is Recovery.CANCELLED:
        mark_revoked(app, run_id)
    elif action is Recovery.FAILED:
        try:
            app.backend.mark_as_failure(run_id, RunFailed(reason))
            with app.events.default_dispatcher() as dispatcher:
                dispatcher.send("task-failed", uuid=run_id, exception=reason, traceback="")
        except Exception:
            logger.exception("could not record run %s as %s in Celery", run_id, action.value)
    else:
        record_restart(app, run_id, reason)


def reap_here() -> int:
    """Destroy sandboxes with expired leases that this host may reap. Their runs are not failed
    here: the recovery sweep restarts them (or fails them after the last attempt)."""
    return len(reap_expired(redis_client(wait_out_outages=False), time.time()))


# After Redis was away longer than a lease, every claim has lapsed although the owners live; they
# re-take their claims at their next 1-s tick. Recovering before that would restart them all.
RECOVERY_GRACE_SECONDS = 3.0


def maintain(app: Any, *, redis_healthy_for: float | None = None) -> dict[str, int]:
    """Reap expired sandbox leases on this host, then restart (or fail) runs that lost their worker
    (neither within ``RECOVERY_GRACE_SECONDS`` of this worker's last Redis failure)."""
    if redis_healthy_for is not None and redis_healthy_for < RECOVERY_GRACE_SECONDS:
        return {"reaped": 0}  # leases and claims may have lapsed while Redis was away: owners renew first
    reaped = reap_here()
    client = redis_client(wait_out_outages=False)
    settings = worker_settings()
    counts = recover_runs(client, app, settings)
    counts["resent"] = resend_queued(client, app, RESEND_AFTER_LEASES * settings.lease_ttl)
    counts["job_runs_started"] = feed_jobs(client, app)
    if reaped or any(counts.values()):
        logger.warning("maintenance: reaped %d sandbox(es); runs %s", reaped, counts)
    return {"reaped": reaped, **counts}
