"""The one way tests wait for something to happen: poll, and fail naming what never came."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str = "condition", interval: float = 0.1) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and return that;
    after ``timeout`` seconds raise an AssertionError saying ``what`` was not reached."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:g}s")
        time.sleep(interval)
