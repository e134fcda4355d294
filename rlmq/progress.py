"""One line of a run's progress, and a printer that writes it only when it says something new."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

__all__ = ["format_progress", "progress_printer"]


def format_progress(record, *, clock: bool = True) -> str:
    p = record.progress or {}
    parts = [record.status.value.lower()]
    attempt = getattr(record, "attempt", 1) or 1
    if attempt > 1:
        parts.append(f"attempt {attempt} (restarted: {record.restart_reason})")
    if p.get("iteration") is not None:
        parts.append(f"iteration {p.get('iteration')}/{p.get('max_iters', '?')}")
    batch = p.get("batch")
    if batch and not record.status.finished:
        parts.append(f"batch {batch.get('done', 0)}/{batch.get('total', 0)} ({batch.get('cache_hits', 0)} cached)")
    parts.append(f"sub-LLM calls {p.get('llm_calls', 0)}")
    parts.append(f"cache hits {p.get('cache_hits', 0)}")
    total = (p.get("usage") or {}).get("total")
    if total:
        parts.append(f"{total.get('paid_input_tokens', 0) + total.get('paid_output_tokens', 0):,} tokens paid")
        parts.append(f"${total.get('cost_paid', 0):.4f} paid / ${total.get('cost_uncached', 0):.4f} uncached"
                     + ("" if total.get("priced", True) else " (some models unpriced)"))
    if clock:
        started = record.started_at or record.spec.submitted_at
        end = record.finished_at or time.time()
        parts.append(f"elapsed {end - started:.1f}s")
    if (p.get("sandbox") or {}).get("isolation") == "process":
        parts.append("sandbox: plain processes, no security boundary (RLMQ_LOCAL_ISOLATION=process)")
    if record.error:
        parts.append(f"error: {record.error}")
    return " · ".join(parts)


def progress_printer(stream=sys.stderr) -> Callable[[Any], None]:
    live = stream.isatty()
    last = [""]

    def show(record) -> None:
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
