"""The recovery sweep: runs whose worker died are started again elsewhere (every rlm worker runs it).

For each run in ``keys.runs_active_key``, ``RunStore.recover`` (one Lua script) decides:
a RUNNING run whose claim expired goes back to QUEUED as the next attempt, or ends FAILED after
``RLMQ_RUN_ATTEMPTS`` (CANCELLED if a cancel was asked for: nobody else would read the flag); this sweep then sends ``run_rlm`` for it again (the run id stays the task
id) and records the restart in Celery's own terms (state RETRY, a ``task-retried`` event), so
``AsyncResult`` and Flower show it waiting, not lost. Any number of workers may sweep at once:
the script lets exactly one of them restart a given run.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import Retry

from rlmq.celery_config import RLM_QUEUE, RUN_TASK
from rlmq.records import RunStore
from rlmq.settings import Settings

__all__ = ["RESEND_AFTER_SECONDS", "recover_runs"]

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
            from workers.run import RunFailed

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
