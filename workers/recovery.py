"""Maintenance of the fleet, run by every rlm worker (and beat, where deployed): sandboxes whose lease
expired are destroyed, and runs whose worker died are started again elsewhere.

``maintain`` runs in every rlm worker's main process every ``RLMQ_MAINTENANCE_INTERVAL`` seconds
(``tasks.watchdog``), and in beat's ``reap_leases`` where beat is deployed: nothing depends on beat.

For each run in ``keys.runs_active_key``, ``RunStore.recover`` (one Lua script) decides:
a RUNNING run whose claim expired goes back to QUEUED as the next attempt, or ends FAILED after
``RLMQ_RUN_ATTEMPTS`` (CANCELLED if a cancel was asked for: nobody else would read the flag); this sweep then sends ``run_rlm`` for it again (the run id stays the task
id) and records the restart in Celery's own terms (state RETRY, a ``task-retried`` event), so
``AsyncResult`` and Flower show it waiting, not lost. Any number of workers may sweep at once:
the script lets exactly one of them restart a given run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.exceptions import Retry

from rlmq.celery_config import RLM_QUEUE, RUN_TASK
from rlmq.store.records import RunStore
from rlmq.settings import Settings
from workers.context import redis_client, worker_settings
from workers.sandbox_registry import reap_expired

__all__ = ["RECOVERY_GRACE_SECONDS", "RESEND_AFTER_SECONDS", "maintain", "reap_here", "recover_runs"]

logger = logging.getLogger(__name__)

# A restarted run still QUEUED after this long is sent again (its message may have been lost with
# the sweeper that restarted it); a duplicate delivery is harmless, the claim runs it once.
RESEND_AFTER_SECONDS = 300.0


def recover_runs(client: Any, app: Any, settings: Settings) -> dict[str, int]:
    store = RunStore(client)
    counts = {"restart": 0, "resend": 0, "failed": 0, "cancelled": 0}
    for run_id in store.active():
        action = store.recover(run_id, max_attempts=settings.run_attempts, lease_seconds=settings.lease_ttl,
                               resend_after=RESEND_AFTER_SECONDS)
        if not action:
            continue
        counts[action] += 1
        record = store.get(run_id)
        reason = (record.restart_reason if record else None) or "worker lost"
        if action in ("failed", "cancelled"):
            logger.error("run %s %s: %s", run_id, action.upper(), record.error if record else reason)
            _celery_state(app, run_id, action, record.error if record else reason)
            continue
        logger.warning("run %s: starting attempt %s (%s)", run_id, record.attempt if record else "?", reason)
        _celery_state(app, run_id, "retried", reason)
        app.send_task(RUN_TASK, args=(run_id,), task_id=run_id, queue=RLM_QUEUE)
    return counts


def _celery_state(app: Any, run_id: str, what: str, reason: str) -> None:
    """RETRY (it will run again), FAILURE or REVOKED, as Celery stores them, plus the event Flower shows."""
    try:
        if what == "failed":
            from workers.run_engine import RunFailed

            app.backend.mark_as_failure(run_id, RunFailed(reason))
        elif what == "cancelled":
            app.backend.mark_as_revoked(run_id, reason="cancelled")
        else:
            app.backend.mark_as_retry(run_id, Retry(reason))
        with app.events.default_dispatcher() as dispatcher:
            if what == "cancelled":
                dispatcher.send("task-revoked", uuid=run_id, terminated=True, signum=None, expired=False)
            else:
                dispatcher.send(f"task-{what}", uuid=run_id, exception=reason, traceback="")
    except Exception:
        logger.exception("could not record run %s as %s in Celery", run_id, what)

def reap_here() -> int:
    """Destroy sandboxes with expired leases that this host may reap. Their runs are not failed
    here: the recovery sweep restarts them (or fails them after the last attempt)."""
    return len(reap_expired(redis_client(), time.time()))


# After Redis was away longer than a lease, every claim has lapsed although the owners live; they
# re-take their claims at their next 1-s tick. Recovering before that would restart them all.
RECOVERY_GRACE_SECONDS = 3.0


def maintain(app: Any, *, redis_healthy_for: float | None = None) -> dict[str, int]:
    """Reap expired sandbox leases on this host, then restart (or fail) runs that lost their worker
    (neither within ``RECOVERY_GRACE_SECONDS`` of this worker's last Redis failure)."""
    if redis_healthy_for is not None and redis_healthy_for < RECOVERY_GRACE_SECONDS:
        return {"reaped": 0}  # leases and claims may have lapsed while Redis was away: owners renew first
    reaped = reap_here()
    counts = recover_runs(redis_client(), app, worker_settings())
    if reaped or any(counts.values()):
        logger.warning("maintenance: reaped %d sandbox(es); runs %s", reaped, counts)
    return {"reaped": reaped, **counts}
