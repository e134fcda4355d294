"""A run's user tools: ``"package.module:function"`` paths from the run spec, imported on the worker.

Tools reach workers the way any Python code does: an installed package, ``PYTHONPATH``, or the
compose image; a run may name only tools the workers' ``RLMQ_ALLOWED_TOOLS`` list
(``rlmq.run_options.check_tools``, applied by the run engine before this). A path that does not import, or names something that is not callable, fails the
run with that reason before any LM call is made.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["ToolLoadError", "load_tools"]

# Names sandbox code already has; a user tool may not shadow them.
RESERVED = frozenset({"llm_query", "llm_query_batched", "SUBMIT", "print"})


class ToolLoadError(ValueError):
    """A user tool could not be loaded; the message is one line naming the tool and why."""


def load_tools(paths: Sequence[str]) -> list[Callable[..., Any]]:
    """The functions behind ``paths``, in order; each is callable from sandbox code by its name."""
    tools: list[Callable[..., Any]] = []
    names: set[str] = set()
    for path in paths:
        module_name, _, attr = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or the module raising while it loads
            raise ToolLoadError(f"tool {path!r}: module {module_name!r} cannot be imported on this worker "
                                f"({type(exc).__name__}: {exc}); install it or put it on the workers' PYTHONPATH") from None
        function = getattr(module, attr, None)
        if not callable(function):
            raise ToolLoadError(f"tool {path!r}: {module_name} has no function {attr!r}")
        if attr in RESERVED or attr in names:
            raise ToolLoadError(f"tool {path!r}: the name {attr!r} is taken")
        names.add(attr)
        tools.append(function)
    return tools
