"""A run's record and result as tests read them: there, or the test fails naming the run."""

from __future__ import annotations

from typing import Any

import redis

from rlmq.store.records import RunRecord, RunStore

__all__ = ["stored_record", "stored_result"]


def stored_record(r: redis.Redis, run_id: str) -> RunRecord:
    record = RunStore(r).get(run_id)
    assert record is not None, f"run {run_id} has no record"
    return record


def stored_result(r: redis.Redis, run_id: str) -> dict[str, Any]:
    result = RunStore(r).result(run_id)
    assert result is not None, f"run {run_id} has no result"
    return result
