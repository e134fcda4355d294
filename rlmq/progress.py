"""One line of a run's progress, and a printer that writes it only when it says something new."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from rlmq.store.records import RunRecord

__all__ = ["format_progress", "progress_printer"]


def format_progress(record: RunRecord, *, clock: bool = True) -> str:
    p = record.progress
    parts = [record.status.value.lower()]
    if record.attempt > 1:
        parts.append(f"attempt {record.attempt} (restarted: {record.restart_reason})")
    if p.max_iters:
        parts.append(f"iteration {p.iteration}/{p.max_iters}")
    if p.batch and not record.status.finished:
        parts.append(f"batch {p.batch.done}/{p.batch.total} ({p.batch.cache_hits} cached)")
    parts.append(f"sub-LLM calls {p.llm_calls}")
    parts.append(f"cache hits {p.cache_hits}")
    if record.started_at is not None:  # a worker took it: its usage is known
        total = p.usage.total
        parts.append(f"{total.paid_tokens:,} tokens paid")
        parts.append(f"${total.cost_paid:.4f} paid / ${total.cost_uncached:.4f} uncached"
                     + ("" if total.priced else " (some models unpriced)"))
    if clock:
        started = record.started_at or record.spec.submitted_at
        end = record.finished_at or time.time()
        parts.append(f"elapsed {end - started:.1f}s")
    if p.sandbox:
        box = p.sandbox
        parts.append(f"sandbox {box.id} ({box.backend}{', ' + box.isolation if box.isolation else ''})")
        if box.isolation == "process":
            parts.append("plain processes, no security boundary (RLMQ_LOCAL_ISOLATION=process)")
    if record.error:
        parts.append(f"error: {record.error}")
    return " · ".join(parts)


def progress_printer(stream: TextIO = sys.stderr) -> Callable[[RunRecord], None]:
    live = stream.isatty()
    last = [""]

    def show(record: RunRecord) -> None:
        # A terminal line is redrawn in place (the clock ticks); a pipe or log gets a new line
        # only when something other than the clock changed.
        line = format_progress(record)
        news = line if live else format_progress(record, clock=False)
        if news == last[0]:
            return
        last[0] = news
        if live:
            stream.write("\r\033[K" + line)
            if record.status.finished:
                stream.write("\n")
        else:
            stream.write(line + "\n")
        stream.flush()

    return show
