"""The clock of one step's own time: it stops while any host tool call of the step is open, so a
step waiting on ``llm_query_batched`` (the fleet) is not charged for it against its code timeout."""

from __future__ import annotations

import threading
import time

__all__ = ["StepClock"]


class StepClock:
    """Time a step spends running its own code: the clock stops while any host tool call is open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.restart()

    def restart(self) -> None:
        with self._lock:
            self._own, self._open, self._since = 0.0, 0, time.monotonic()

    def enter(self) -> None:
        with self._lock:
            if self._open == 0:
                self._own += time.monotonic() - self._since
            self._open += 1

    def leave(self) -> None:
        with self._lock:
            self._open = max(0, self._open - 1)
            if self._open == 0:
                self._since = time.monotonic()

    def own_time(self) -> float:
        with self._lock:
            return self._own + (0.0 if self._open else time.monotonic() - self._since)
