"""``RLMQ_LOG_FORMAT=json``: each worker log line as one JSON object that joins the run's trace.

Fields: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, ``process``, ``thread``, and
when the line was written for a run: ``run_id``, ``attempt``; when tracing is on: ``trace_id`` and
``span_id`` of the span under way (else of the run's own span), so a log search and a trace view
meet on the same ids. The run engine and ``llm_batch`` say which run a thread works for
(``log_context``); a traceback is one ``exc_info`` string field.

Also how one message or error reads on one line (``one_line``, ``error_text``), for status lines and logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

__all__ = ["JsonFormatter", "error_text", "install_json_logs", "log_context", "one_line"]

def one_line(text: str, limit: int = 300) -> str:
    """An error for a status line: whitespace (newlines included) collapsed, at most ``limit`` chars."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def error_text(exc: BaseException) -> str:
    """An exception for a log line, its message included: redis-py 8's ``repr`` of an error is only
    its kind (``network:ConnectionError``), which says nothing of which host refused or why."""
    return one_line(f"{type(exc).__name__}: {exc}")


_RUN: ContextVar[tuple[str, int | None, Any] | None] = ContextVar("rlmq_log_run", default=None)


@contextlib.contextmanager
def log_context(run_id: str | None, attempt: int | None = None, spans: Any = None) -> Iterator[None]:
    """Lines logged in this thread name the run (and its span, from ``workers.tracing.RunSpans``)."""
    token = _RUN.set((run_id, attempt, spans) if run_id else None)
    try:
        yield
    finally:
        _RUN.reset(token)


def _span_ids(spans: Any) -> tuple[str, str] | None:
    if "opentelemetry.trace" not in sys.modules:  # tracing off: nothing to join, nothing to import
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid and spans is not None and getattr(spans, "run", None) is not None:
        context = spans.run.get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "process": record.process, "thread": record.threadName,
        }
        run = _RUN.get()
        if run is not None:
            out["run_id"] = run[0]
            if run[1] is not None:
                out["attempt"] = run[1]
        ids = _span_ids(run[2] if run is not None else None)
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def install_json_logs(logger: logging.Logger) -> None:
    """Every handler of ``logger`` (Celery's, once it has set them up) writes JSON lines."""
    formatter = JsonFormatter()
    for handler in logger.handlers:
        handler.setFormatter(formatter)
