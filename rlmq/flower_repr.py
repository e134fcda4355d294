"""What a run's task message says about it in Flower: its signature and each input's kind and size.

``run_rlm`` takes only the run id (the spec lives in Redis), so Flower would list every run as
``rlmq.run_rlm('<id>',)``. ``send_task(argsrepr=..., kwargsrepr=...)`` sets what task events
carry instead: the signature as the arguments, and each input's name with its kind and size plus
the run's options as the keyword arguments. Never the data itself.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["describe_inputs", "describe_value", "human_bytes", "task_reprs"]

_REPR_LIMIT = 1000  # Celery cuts argsrepr/kwargsrepr at 1024 characters anyway


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def describe_value(value: Any) -> str:
    """``list[117], 2.7 MB`` / ``str, 48 B`` / ``dict[3], 1.2 KB``: kind, length and JSON size."""
    try:
        size = len(json.dumps(value, ensure_ascii=False, default=str).encode())
    except (TypeError, ValueError):
        size = len(str(value).encode())
    kind = type(value).__name__
    if isinstance(value, (list, tuple, dict, set)):
        kind = f"{kind}[{len(value)}]"
    return f"{kind}, {human_bytes(size)}"


def describe_inputs(inputs: dict[str, Any]) -> dict[str, str]:
    return {name: describe_value(value) for name, value in inputs.items()}


def task_reprs(spec: Any, described: dict[str, str]) -> dict[str, str]:
    """``argsrepr`` / ``kwargsrepr`` for ``send_task`` of a run (a ``RunSpec``)."""
    kwargs: dict[str, object] = {name: described.get(name, "?") for name in spec.inputs}
    kwargs.update(dict(sorted(spec.options.items())))
    if spec.tools:
        kwargs["tools"] = list(spec.tools)
    if spec.parent:  # a child run (rlm_query): Flower shows whose
        kwargs["parent"] = spec.parent
    return {"argsrepr": repr(spec.signature)[:_REPR_LIMIT], "kwargsrepr": repr(kwargs)[:_REPR_LIMIT]}
