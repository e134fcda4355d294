"""Running a host process as uid 65534 (the unprivileged case) from a root test run.

It needs the checkout and the venv's packages to be readable by that uid. A clone under a 0700
directory (``mktemp -d``, a root home) is not: then the tests that need it skip and say why,
instead of failing on an import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

NOBODY = 65534
SETPRIV = shutil.which("setpriv")
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter may live under /root, closed to uid 65534
REPO = Path(__file__).resolve().parents[2]


def unreadable_for_nobody(*paths: str) -> list[str]:
    """Which of ``paths`` uid 65534 cannot read and traverse (all of them if it cannot run at all)."""
    if os.geteuid() != 0 or not SETPRIV or not os.path.exists(SYSTEM_PYTHON):
        return list(paths)
    check = "import os, sys\nprint('\\n'.join(p for p in sys.argv[1:] if not os.access(p, os.R_OK | os.X_OK)))"
    done = subprocess.run([SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", SYSTEM_PYTHON,
                           "-c", check, *paths], capture_output=True, text=True, timeout=30)
    return [line for line in done.stdout.splitlines() if line] if done.returncode == 0 else list(paths)


def _checkout_problem() -> str:
    if os.geteuid() != 0 or not SETPRIV or not os.path.exists(SYSTEM_PYTHON):
        return f"needs root, setpriv and {SYSTEM_PYTHON} to run a host as uid {NOBODY}"
    closed = unreadable_for_nobody(str(REPO), sysconfig.get_paths()["purelib"])
    return (f"uid {NOBODY} cannot read {', '.join(closed)} (a parent directory is closed to it): "
            "run the suite from a checkout other users can read to test the unprivileged case") if closed else ""


needs_nobody_readable_checkout = pytest.mark.skipif(bool(_checkout_problem()), reason=_checkout_problem() or "ok")
