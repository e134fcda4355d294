"""A run's 1-s tick: a :class:`~workers.ticker.Ticker` of its own (the sandbox leases have theirs).

Each tick keeps the run's claim and publishes its progress. When the claim is lost (the run moved on
to another attempt), a cancel is requested, the worker is shutting down (``workers.drain``: the run is
handed back, ``handing_back``), or the run's wall-clock budget runs out, it deletes the
run's sandbox instead, so the step running in it fails at once, and no sandbox may start after it (one
still booting is deleted as its boot ends); ``cancelled`` also stops the fan-out.
"""

from __future__ import annotations

import logging
import threading

from workers.budget import Budget, BudgetExceeded
from workers.claim import RunClaim
from workers.progress_publisher import ProgressPublisher
from workers.sandbox_registry import LeaseKeeper
from workers.ticker import Ticker
from workers.tree_budget import TreeBudget

__all__ = ["RunTicker"]

logger = logging.getLogger(__name__)


class RunTicker(Ticker):
    def __init__(self, run_id: str, *, claim: RunClaim, leases: LeaseKeeper, progress: ProgressPublisher) -> None:
        super().__init__(f"run-{run_id[:8]}", 1.0, self.tick)
        self.run_id = run_id
        self.claim, self.leases, self.progress = claim, leases, progress
        self.budget: Budget | None = None  # the run's, once its settings are known
        self.cancelled = threading.Event()  # set on a cancel, when fenced off and when handing back
        self.handing_back = threading.Event()  # the worker is shutting down: the run goes back to the queue
        self.root_id = run_id  # the run's tree's root, whose cancel is this run's too
        self.tree: TreeBudget | None = None  # in a tree: its live-sandbox slot is renewed here

    def tick(self) -> None:
        if self.claim.fenced.is_set():
            return  # the run is stopping
        seen = self.claim.tick(cancel_of=(self.run_id, self.root_id))  # one round trip for the three
        if not seen.held:
            return self._stop_sandbox(f"attempt {self.claim.attempt} lost its claim (restarted elsewhere or finished)")
        if not self.cancelled.is_set() and seen.cancel_requested:
            return self._stop_sandbox("cancel requested")
        if not self.cancelled.is_set() and seen.draining:
            self.handing_back.set()
            return self._stop_sandbox("the worker is shutting down: handing the run back")
        if self.budget is not None and self.budget.tripped is None:
            try:
                self.budget.check_time()
            except BudgetExceeded as exc:  # a step may run long: it stops now, as on a cancel
                return self._stop_sandbox(str(exc), cancel=False)
        if self.tree is not None:
            self.tree.renew_sandbox()
            if self.budget is not None:
                self.tree.paid(*self.budget.usage.paid())
        self.progress.publish()

    def _stop_sandbox(self, why: str, *, cancel: bool = True) -> None:
        logger.warning("run %s: %s; deleting its sandbox", self.run_id, why)
        if cancel:
            self.cancelled.set()
        self.leases.close(why)
