"""A run's progress as monitors see it, published while the run works.

:class:`ProgressPublisher` builds the progress document (iteration, elapsed time, the run's counters,
its sandbox) and publishes it through :mod:`workers.monitor` and the run's claim (the record's write
is fenced by the attempt): at once when forced (a new iteration, a new sandbox), else at most every
``PUBLISH_EVERY`` seconds and only when the sub-call counters moved; never after :meth:`~ProgressPublisher.close`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from dspy.utils.callback import BaseCallback

from rlmq.store.records import Progress, RunSandbox
from workers.claim import RunClaim
from workers.dspy_private import iteration_of
from workers.monitor import count, publish_progress
from workers.usage import RunUsage

__all__ = ["PUBLISH_EVERY", "IterationCallback", "ProgressPublisher"]

logger = logging.getLogger(__name__)

PUBLISH_EVERY = 0.5  # seconds between progress updates while counters move


class ProgressPublisher:
    def __init__(self, task: Any, run_id: str, *, hostname: str, claim: RunClaim, client: redis.Redis) -> None:
        self.task = task
        self.run_id = run_id
        self.hostname = hostname
        self.claim = claim
        self.client = client  # fleet counters
        self.stats = RunUsage(root_model="", sub_model="")  # the run's counters; its models once it is set up
        self.iteration = 0
        self.max_iters = 0
        self.sandbox: RunSandbox | None = None  # the run's sandbox, once it exists
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._lock = threading.Lock()
        self._last_publish = 0.0
        self._last_counts: tuple[int, int] = (0, 0)
        self._counted: tuple[int, int] = (0, 0)
        self._closed = False

    def sandbox_created(self, info: Any) -> None:
        """Keep what isolates the run's sandbox in its progress ("process" is no boundary: said loudly)."""
        self.sandbox = RunSandbox(backend=info.backend.value, id=info.sandbox_id,
                                  isolation=info.isolation.value if info.isolation else "")
        if info.isolation == "process":
            logger.warning("run %s: its local sandbox is plain processes (RLMQ_LOCAL_ISOLATION=process), "
                           "no security boundary", self.run_id)
        self.publish(force=True)

    def snapshot(self) -> Progress:
        return self.stats.progress(iteration=self.iteration, max_iters=self.max_iters,
                                   elapsed=time.monotonic() - self.started, sandbox=self.sandbox)

    def close(self) -> Progress:
        """The last progress, for the run's final write; nothing is published after it, so no late
        update can overwrite the final Celery state (REVOKED, FAILURE) with STARTED."""
        with self._lock:
            self._closed = True
            return self.snapshot()

    def publish(self, *, force: bool = False) -> None:
        """Report progress to the run record, the result backend and Flower (event); never raises."""
        with self._lock:
            if self._closed:
                return
            meta = self.snapshot()
            counts = (meta.llm_calls, meta.cache_hits)
            now = time.monotonic()
            if not force and (counts == self._last_counts or now - self._last_publish < PUBLISH_EVERY):
                return
            self._last_publish, self._last_counts = now, counts
            try:
                if not self.claim.write_progress(meta):
                    return  # superseded or finished: Celery's state is no longer ours to write
                publish_progress(self.task, self.run_id, self.hostname, meta, started_at=self.started_wall)
                count(self.client, [("subcalls", counts[0] - self._counted[0]),
                                    ("cache_hits", counts[1] - self._counted[1])])
                self._counted = counts
            except Exception:  # monitoring must never break the run
                logger.exception("could not publish progress of run %s", self.run_id)


class IterationCallback(BaseCallback):
    """Publishes the start of each RLM iteration (the action predictor's call carries "k/max")."""

    def __init__(self, publisher: ProgressPublisher, predictor: Any) -> None:
        self.publisher = publisher
        self.predictor = predictor

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if instance is not self.predictor:
            return
        iteration = iteration_of(inputs)
        if iteration is not None:
            self.publisher.iteration = iteration
            self.publisher.publish(force=True)
