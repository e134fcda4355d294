"""``reap_leases`` (beat), the ``rlmq_reap_local`` remote control command, and reaping at worker start.

The same maintenance runs without beat, in every rlm worker (``tasks.watchdog``)."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.worker.control import control_command

from rlmq.celery_config import REAP_TASK
from tasks.app import app
from workers.recovery import maintain, reap_here

__all__ = ["reap_leases"]

logger = logging.getLogger(__name__)


@app.task(name=REAP_TASK, ignore_result=True, send_events=False)
def reap_leases() -> int:
    """Beat's maintenance: reap expired leases here, restart lost runs, ask every worker to reap its host's."""
    done = maintain(app)
    app.control.broadcast("rlmq_reap_local")
    return done["reaped"]


@control_command()
def rlmq_reap_local(state: Any) -> dict[str, int]:
    """Remote control: reap expired leases of local sandboxes that live on this worker's host."""
    return {"ok": reap_here()}


@signals.worker_ready.connect
def _reap_on_start(sender: Any = None, **_: Any) -> None:
    """A restarted worker first cleans up what its predecessor on this host left behind."""
    try:
        reaped = reap_here()
        if reaped:
            logger.warning("reaped %d expired sandbox lease(s) at start", reaped)
    except Exception:
        logger.exception("lease reaping at worker start failed")
