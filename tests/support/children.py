"""Child processes of a test, forked from the session's forkserver (the ``mp_context`` fixture)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = ["exit_code", "run_children"]


def exit_code(child: BaseProcess, timeout: float) -> int | None:
    """The child's exit code once it ended; None when it was still running after ``timeout`` and was killed."""
    child.join(timeout)
    if child.exitcode is not None:
        return child.exitcode
    child.kill()
    child.join()
    return None


def run_children(context: ForkServerContext, target: Callable[..., Any], args_per_child: Sequence[tuple],
                 timeout: float = 60.0) -> None:
    """One child per argument tuple, all started before any is awaited; each must exit 0 within ``timeout``
    (a child's uncaught exception is printed on its stderr and makes its exit code 1)."""
    children = [context.Process(target=target, args=args) for args in args_per_child]
    for child in children:
        child.start()
    for number, child in enumerate(children):
        code = exit_code(child, timeout)
        assert code == 0, f"child {number} of {target.__name__}: " + (
            f"exit code {code}" if code is not None else f"still running after {timeout:g}s")
