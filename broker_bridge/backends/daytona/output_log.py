"""A sandbox's streamed output, logged line by line minus the runtime's keep-alive lines, with a tail
kept for error messages."""

from __future__ import annotations

import collections
import logging
import threading

from broker_bridge.sandbox.protocol import KEEPALIVE_MARKER

__all__ = ["OutputLog"]

log = logging.getLogger("broker_bridge.backends.daytona")


class OutputLog:
    """Logs a sandbox's streamed output line by line, minus the runtime's keep-alive lines."""

    def __init__(self, name: str, logger: logging.Logger = log, tail_chars: int = 4000,
                 max_line: int = 64 * 1024) -> None:
        self.name, self.logger, self.max_line = name, logger, max_line
        self._partial = {"stdout": "", "stderr": ""}
        self._tail: collections.deque[str] = collections.deque()
        self._tail_chars, self._tail_size = tail_chars, 0
        self._lock = threading.Lock()

    def feed(self, stream: str, text: str) -> None:
        with self._lock:
            buffered = self._partial[stream] + text
            *lines, rest = buffered.split("\n")
            while len(rest) > self.max_line:  # a runaway line is logged in pieces, never hoarded
                lines.append(rest[: self.max_line])
                rest = rest[self.max_line:]
            self._partial[stream] = rest
            for line in lines:
                self._emit(stream, line)

    def flush(self) -> None:
        with self._lock:
            for stream, rest in self._partial.items():
                if rest:
                    self._emit(stream, rest)
                self._partial[stream] = ""

    def tail(self) -> str:
        with self._lock:
            return "\n".join(self._tail)

    def _emit(self, stream: str, line: str) -> None:
        line = line.replace(KEEPALIVE_MARKER, "").rstrip("\r")
        if not line.strip():
            return
        self.logger.log(logging.INFO if stream == "stderr" else logging.DEBUG, "[%s %s] %s",
                        self.name, stream, line)
        self._tail.append(line)
        self._tail_size += len(line)
        while self._tail_size > self._tail_chars and len(self._tail) > 1:
            self._tail_size -= len(self._tail.popleft())
