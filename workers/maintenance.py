"""Periodic maintenance: destroy sandboxes whose lease expired, and restart runs whose worker died.

``maintain`` runs in every rlm worker's main process every ``RLMQ_MAINTENANCE_INTERVAL`` seconds
(``tasks.watchdog``), and in beat's ``reap_leases`` where beat is deployed: nothing depends on beat.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from workers.context import redis_client, worker_settings
from workers.recovery import recover_runs
from workers.sandbox_registry import reap_expired

__all__ = ["maintain", "reap_here"]

logger = logging.getLogger(__name__)


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
