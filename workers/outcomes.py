"""How a run that did not succeed ends: an ordered table from the exception that ended it to the
run's final status and what Celery is told (as dramatiq's ``Retries`` maps ``throws`` to a fate).

The first row whose types match wins, so specific rows come first. Before the table is read,
:func:`deciding_exception` lets a cancel or a tripped budget outrank whatever it caused: deleting a
cancelled run's sandbox fails the step that was running in it, and that failure is not the story.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from enum import Enum
from typing import Any

from celery.exceptions import Retry, SoftTimeLimitExceeded

from rlmq.store.records import RunStatus
from workers.budget import BudgetExceeded
from workers.fanout import FanoutCancelled
from workers.log_format import one_line

__all__ = ["OUTCOMES", "CeleryEnd", "Ending", "HandedBack", "Outcome", "RunCancelled", "RunFailed",
           "deciding_exception", "ending_of", "mark_revoked", "outcome_of", "record_restart"]

logger = logging.getLogger(__name__)


class RunFailed(Exception):
    """The run ended badly; the message is the recorded error (details are in the worker log)."""


class RunCancelled(Exception):
    """A cancel was requested for this run."""


class HandedBack(Exception):
    """The worker is shutting down: the run goes back to the queue for another worker (``workers.drain``)."""


class CeleryEnd(Enum):
    """What the run's Celery task does once the run's end is recorded."""

    REVOKED = "revoked"  #: state REVOKED as Celery stores it, a task-revoked event, then ``Ignore``
    FAILURE = "failure"  #: raise ``RunFailed(error line)``: Celery stores FAILURE with that line
    REQUEUE = "requeue"  #: nothing recorded: the claim lapses now, the exception goes on, the sweep restarts the run
    HANDBACK = "handback"  #: queued again as the next attempt at once, state RETRY, then ``Ignore``


@dataclass(frozen=True)
class Outcome:
    status: RunStatus | None  # None: the run's record is not written
    celery: CeleryEnd
    error: str  # the recorded error; ``{exc}``, ``{type}`` and ``{time_limit}`` are filled in
    log_level: int = logging.ERROR
    traceback: bool = False  # keep the traceback's tail in the record's ``error_detail``

    def error_of(self, exc: BaseException, *, time_limit: float) -> str:
        return self.error.format(exc=exc, type=type(exc).__name__, time_limit=time_limit)


OUTCOMES: tuple[tuple[tuple[type[BaseException], ...], Outcome], ...] = (
    ((RunCancelled, FanoutCancelled), Outcome(RunStatus.CANCELLED, CeleryEnd.REVOKED, "cancelled", logging.INFO)),
    ((HandedBack,), Outcome(None, CeleryEnd.HANDBACK, "{exc}", logging.WARNING)),
    ((BudgetExceeded,), Outcome(RunStatus.STOPPED, CeleryEnd.FAILURE, "budget exceeded: {exc}", logging.WARNING)),
    ((SoftTimeLimitExceeded,), Outcome(RunStatus.FAILED, CeleryEnd.FAILURE,
                                       "time limit: the run took longer than {time_limit:g}s", traceback=True)),
    ((RunFailed,), Outcome(RunStatus.FAILED, CeleryEnd.FAILURE, "{exc}", traceback=True)),
    ((Exception,), Outcome(RunStatus.FAILED, CeleryEnd.FAILURE, "{type}: {exc}", traceback=True)),
    # KeyboardInterrupt, SystemExit: the worker itself is stopping; another worker runs the run again.
    ((BaseException,), Outcome(None, CeleryEnd.REQUEUE, "the worker stopped", logging.WARNING)),
)


def outcome_of(exc: BaseException) -> Outcome:
    return next(outcome for types, outcome in OUTCOMES if isinstance(exc, types))


@dataclass(frozen=True)
class Ending:
    """How one run ends: its deciding exception, the table's row for it, the recorded error."""

    exc: BaseException
    outcome: Outcome
    message: str

    @property
    def line(self) -> str:
        return one_line(self.message)

    @property
    def detail(self) -> str | None:
        """The message and the traceback's tail, for the record's ``error_detail`` (failures only)."""
        if not self.outcome.traceback:
            return None
        tail = "".join(traceback.format_exception(type(self.exc), self.exc, self.exc.__traceback__)[-6:])[-4000:]
        return f"{self.message}\n\n{tail}"


def ending_of(exc: BaseException, *, cancel_requested: bool, budget_tripped: str | None,
              time_limit: float, handing_back: str | None = None) -> Ending:
    exc = deciding_exception(exc, cancel_requested=cancel_requested, budget_tripped=budget_tripped,
                             handing_back=handing_back)
    outcome = outcome_of(exc)
    return Ending(exc, outcome, outcome.error_of(exc, time_limit=time_limit))


def deciding_exception(exc: BaseException, *, cancel_requested: bool, budget_tripped: str | None,
                       handing_back: str | None = None) -> BaseException:
    """The exception that decides the run's fate: a cancel first, then the worker's shutdown handing the
    run back (``handing_back``: why; not once a budget has ended it), then a tripped budget, else ``exc``."""
    if isinstance(exc, RunCancelled):
        return exc
    if cancel_requested:
        return RunCancelled()
    if handing_back is not None and budget_tripped is None and not isinstance(exc, (HandedBack, BudgetExceeded)):
        return HandedBack(handing_back)  # the stopped sandbox or fan-out that followed is not the story
    if isinstance(exc, FanoutCancelled):
        return exc
    if budget_tripped is not None:
        return BudgetExceeded(budget_tripped)  # the first reason, also when a later check raised
    return exc


def mark_revoked(app: Any, run_id: str, *, hostname: str | None = None, request: Any = None) -> None:
    """REVOKED as Celery itself stores it (an exception record ``AsyncResult`` can read), and the final
    ``task-revoked`` event that ends the task in Flower."""
    try:
        app.backend.mark_as_revoked(run_id, reason="cancelled", request=request)
        with app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send("task-revoked", uuid=run_id, terminated=True, signum=None, expired=False)
    except Exception:
        logger.exception("could not record run %s as revoked in Celery", run_id)


def record_restart(app: Any, run_id: str, reason: str) -> None:
    """RETRY as Celery stores it and the ``task-retried`` event Flower shows: the run will run again."""
    try:
        app.backend.mark_as_retry(run_id, Retry(reason))
        with app.events.default_dispatcher() as dispatcher:
            dispatcher.send("task-retried", uuid=run_id, exception=reason, traceback="")
    except Exception:
        logger.exception("could not record run %s as restarted in Celery", run_id)
