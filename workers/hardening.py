"""Worker processes are not dumpable, from their start.

A non-dumpable process's ``/proc/<pid>/environ``, ``mem``, ``maps`` and the like belong to root,
and ptrace is refused, so another process of the same uid — a sandbox's code, say — cannot read
the provider keys and the Redis password in a worker's environment or memory. ``tasks.app``
calls this in the main worker process (``celeryd_init``) and in every pool child
(``worker_process_init``). Linux only; elsewhere it does nothing. (The same 5 lines as
``broker_bridge.sandbox.protocol.protect_host_process``, kept here so the workers do not depend
on the sandbox side's module.)
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["make_non_dumpable"]

_PR_SET_DUMPABLE = 4


def make_non_dumpable() -> bool:
    """``prctl(PR_SET_DUMPABLE, 0)`` for this process; True if it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
