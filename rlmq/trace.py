"""A run's trajectory as people and tools read it: ``rlmq trace RUN`` and ``Client.trace``.

The worker appends one JSON entry per step to ``keys.run_trajectory_key`` as the step ends
(``workers.trajectory`` documents the fields), so a running run's trace shows every finished
step. Text output highlights code with Pygments when it is installed and the output is a
terminal; ``--json`` prints one document, ``--jsonl`` one step per line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis

from rlmq.store.keys import run_trajectory_key
from rlmq.store.records import RunRecord, Usage

__all__ = ["format_money", "format_trace", "format_usage", "read_trajectory"]


def read_trajectory(client: redis.Redis, run_id: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(run_trajectory_key(run_id), 0, -1)]


def format_money(amount: float) -> str:
    return f"${amount:.4f}" if amount == 0 or amount >= 0.0001 else f"${amount:.2e}"


def format_usage(usage: Usage) -> str:
    """``root 4 calls (1 cached) · sub 118 calls (118 cached, 0 errors) · 12,345 in / 678 out tokens ·
    $0.0001 paid / $0.0012 uncached``."""
    root, sub, total = usage.root, usage.sub, usage.total
    if not total.calls:
        return "no LM call yet"
    parts = [f"root {root.calls} calls ({root.cache_hits} cached)",
             f"sub {sub.calls} calls ({sub.cache_hits} cached, {sub.errors} errors)",
             f"{total.input_tokens:,} in / {total.output_tokens:,} out tokens"]
    money = f"{format_money(total.cost_paid)} paid / {format_money(total.cost_uncached)} uncached"
    parts.append(money if total.priced else money + " (some models unpriced)")
    return " · ".join(parts)


def _step_usage(step: dict[str, Any]) -> str:
    usage = Usage.from_json_dict(step)  # a step has the root and sub usage groups of its calls
    root, sub, total = usage.root, usage.sub, usage.total
    parts = [f"root {root.calls} call(s){' cached' if root.cache_hits else ''}"]
    if sub.calls:
        parts.append(f"sub-calls {sub.calls} ({sub.cache_hits} cached, {sub.errors} errors, {sub.seconds:.2f}s)")
    parts.append(f"{format_money(total.cost_paid)} paid / {format_money(total.cost_uncached)} uncached")
    return " · ".join(parts)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in (text or "").splitlines()) or "    (empty)"


def _highlighter(color: bool) -> Callable[[str], str]:
    if not color:
        return lambda code: code
    try:
        from pygments import highlight
        from pygments.formatters import TerminalFormatter
        from pygments.lexers import PythonLexer
    except ImportError:
        return lambda code: code
    lexer, formatter = PythonLexer(), TerminalFormatter()
    return lambda code: str(highlight(code, lexer, formatter)).rstrip("\n")


def format_trace(record: RunRecord, steps: list[dict[str, Any]], *, color: bool = False) -> str:
    """The whole trajectory, step by step, for a terminal or a pipe."""
    show_code = _highlighter(color)
    lines = [f"run {record.spec.run_id}  {record.status.value.lower()} · {len(steps)} step(s)"
             + (f" · error: {record.error}" if record.error else ""),
             f"signature: {record.spec.signature}",
             f"usage: {format_usage(record.progress.usage)}"]
    for step in steps:
        head = (f"── step {step.get('step')} ({step.get('kind', 'code')}{', final' if step.get('final') else ''}) "
                f"· {step.get('seconds', 0):.2f}s (LM {step.get('lm_seconds', 0):.2f}s, code "
                f"{step.get('exec_seconds', 0):.2f}s) · {_step_usage(step)}")
        lines += ["", head, "reasoning:", _indent(step.get("reasoning", ""))]
        if step.get("code"):
            lines += ["code:", _indent(show_code(step["code"]))]
        cut = f", {step['output_cut']:,} cut here" if step.get("output_cut") else ""
        lines += [f"output ({step.get('output_chars', 0):,} chars{cut}):", _indent(step.get("output", ""))]
    if not steps:
        lines += ["", "(no step has finished yet)"]
    return "\n".join(lines)
