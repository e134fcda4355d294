"""The outcome table: which ending a run gets for the exception that ended it (the fleet tests in
test_reliability_runs.py and test_run_sight.py see the same endings end to end)."""

from __future__ import annotations

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from dspy.primitives.code_interpreter import CodeInterpreterError

from rlmq.store.records import RunStatus
from workers.budget import BudgetExceeded
from workers.fanout import FanoutCancelled
from workers.outcomes import (
    OUTCOMES,
    CeleryEnd,
    HandedBack,
    RunCancelled,
    RunFailed,
    deciding_exception,
    one_line,
    outcome_of,
)


@pytest.mark.parametrize(("exc", "status", "celery", "error"), [
    (RunCancelled(), RunStatus.CANCELLED, CeleryEnd.REVOKED, "cancelled"),
    (FanoutCancelled("run cancelled"), RunStatus.CANCELLED, CeleryEnd.REVOKED, "cancelled"),
    (BudgetExceeded("max cost: $2 > $1"), RunStatus.STOPPED, CeleryEnd.FAILURE, "budget exceeded: max cost: $2 > $1"),
    (SoftTimeLimitExceeded(), RunStatus.FAILED, CeleryEnd.FAILURE, "time limit: the run took longer than 90s"),
    (RunFailed("tool x: no module y"), RunStatus.FAILED, CeleryEnd.FAILURE, "tool x: no module y"),
    (CodeInterpreterError("sandbox died"), RunStatus.FAILED, CeleryEnd.FAILURE, "CodeInterpreterError: sandbox died"),
    (KeyboardInterrupt(), None, CeleryEnd.REQUEUE, "the worker stopped"),
    (SystemExit(1), None, CeleryEnd.REQUEUE, "the worker stopped"),
])
def test_each_ending_has_its_status_and_celery_end(exc, status, celery, error) -> None:
    outcome = outcome_of(exc)
    assert (outcome.status, outcome.celery, outcome.error_of(exc, time_limit=90.0)) == (status, celery, error)


def test_rows_are_ordered_specific_first() -> None:
    """A row never comes after a row that already matches all of its types (it could never be read)."""
    for i, (types, _) in enumerate(OUTCOMES):
        for earlier, _ in OUTCOMES[:i]:
            assert not all(issubclass(t, earlier) for t in types), (types, earlier)


def test_a_cancel_then_a_tripped_budget_outrank_what_they_caused() -> None:
    died = CodeInterpreterError("sandbox deleted")  # what deleting the sandbox does to the running step
    assert isinstance(deciding_exception(died, cancel_requested=True, budget_tripped="time"), RunCancelled)
    stopped = deciding_exception(died, cancel_requested=False, budget_tripped="time limit: 61s of 60s")
    assert isinstance(stopped, BudgetExceeded) and str(stopped) == "time limit: 61s of 60s"
    later = BudgetExceeded("max tokens: ...")  # a later check: the first reason is the one kept
    assert str(deciding_exception(later, cancel_requested=False, budget_tripped="max cost: ...")) == "max cost: ..."
    fanout = FanoutCancelled("run cancelled")
    assert deciding_exception(fanout, cancel_requested=False, budget_tripped="x") is fanout
    assert deciding_exception(died, cancel_requested=False, budget_tripped=None) is died


def test_a_hand_back_outranks_what_it_caused_but_not_a_cancel_or_a_budget() -> None:
    why = "handed back: worker w1 is shutting down"
    for caused in (CodeInterpreterError("sandbox deleted"), FanoutCancelled("stopping")):
        handed = deciding_exception(caused, cancel_requested=False, budget_tripped=None, handing_back=why)
        assert isinstance(handed, HandedBack) and str(handed) == why
        assert outcome_of(handed).status is None and outcome_of(handed).celery is CeleryEnd.HANDBACK
    died = CodeInterpreterError("sandbox deleted")
    assert isinstance(deciding_exception(died, cancel_requested=True, budget_tripped=None, handing_back=why),
                      RunCancelled)
    assert isinstance(deciding_exception(died, cancel_requested=False, budget_tripped="max cost: ...",
                                         handing_back=why), BudgetExceeded)


def test_one_line() -> None:
    assert one_line("Traceback:\n  File x\n\tValueError:  bad\n") == "Traceback: File x ValueError: bad"
    assert one_line("x" * 400) == "x" * 299 + "…"
