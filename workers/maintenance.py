"""Periodic maintenance: destroy sandboxes whose lease expired, and record their runs as lost."""

from __future__ import annotations

import logging
import time

from rlmq.records import RunStore
from workers.context import redis_client
from workers.sandbox_registry import reap_expired

__all__ = ["reap_here"]

logger = logging.getLogger(__name__)


def reap_here() -> int:
    """Destroy sandboxes with expired leases that this host may reap; a run left RUNNING by a
    dead worker (its claim expired too) is recorded as FAILED, so it does not hang forever."""
    client = redis_client()
    reaped = reap_expired(client, time.time())
    store = RunStore(client)
    for lease in reaped:
        if store.fail_if_orphaned(lease.run_id, f"worker lost: {lease.owner} stopped renewing the run's sandbox lease"):
            logger.warning("run %s marked FAILED: its worker %s is gone", lease.run_id, lease.owner)
    return len(reaped)
