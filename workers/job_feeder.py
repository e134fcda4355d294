"""Keeping corpus jobs fed from the workers: when one of a job's runs ends (the run engine), and in every
rlm worker's maintenance sweep for every job still feeding (a safety net: a feeder that crashed, a run
cancelled by a client or failed by the recovery sweep). The step itself is ``rlmq.job_feed.feed_job``.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from rlmq.job_feed import feed_job
from rlmq.store.jobs import JobStore
from workers.context import worker_settings

__all__ = ["feed_after_run", "feed_jobs"]

logger = logging.getLogger(__name__)


def feed_after_run(client: redis.Redis, app: Any, job_id: str, run_id: str) -> None:
    """Settle the run that just ended and start the job's next ones; never fails the run."""
    try:
        feed_job(client, app, job_id, expire_seconds=worker_settings().result_expires)
    except Exception:  # the maintenance sweep feeds the job again
        logger.exception("run %s: could not feed its job %s", run_id, job_id)


def feed_jobs(client: redis.Redis, app: Any) -> int:
    """One feeding step of every job still feeding; how many runs they started."""
    started = 0
    for job_id in JobStore(client).feeding():
        try:
            started += feed_job(client, app, job_id, expire_seconds=worker_settings().result_expires)
        except redis.ConnectionError:
            raise
        except Exception:
            logger.exception("maintenance: could not feed job %s", job_id)
    return started
