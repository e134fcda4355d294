"""A daemon thread that calls one job at a fixed interval: a run's 1-s tick, a sandbox lease
keeper, a worker's heartbeat, the rlm worker's maintenance sweep. One thread per job, so a slow
job (a sweep deleting Daytona sandboxes with retries) never delays another (the heartbeat)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Ticker"]

logger = logging.getLogger(__name__)


class Ticker:
    """Calls ``job`` every ``interval`` seconds (after the first interval) until :meth:`stop`; a call that
    raises is logged and the next one still comes."""

    def __init__(self, name: str, interval: float, job: Callable[[], object]) -> None:
        self.name = name
        self.interval = interval
        self.job = job
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop ticking; waits up to ``timeout`` for a call in progress (a daemon thread: never longer)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.job()
            except Exception:
                logger.exception("%s: a tick failed", self.name)
