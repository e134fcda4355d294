"""The house's rules: imports point one way, and the user's side never loads the worker runtime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import cli_env

REPO = Path(__file__).resolve().parents[1]
# package -> top-level modules it must never import (also not lazily, inside a function)
FORBIDDEN = {
    "rlmq": {"workers", "tasks", "broker_bridge", "dspy", "litellm"},
    "workers": {"tasks"},
    "broker_bridge": {"rlmq", "workers", "tasks", "celery", "redis"},
}
HEAVY = ("dspy", "litellm", "workers.run_engine", "tasks.run_rlm", "broker_bridge")


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    offences = []
    for path in sorted((REPO / package).rglob("*.py")):
        bad = imported_packages(path) & FORBIDDEN[package]
        if bad:
            offences.append(f"{path.relative_to(REPO)} imports {', '.join(sorted(bad))}")
    assert not offences, offences


def loaded_modules(*python_args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> set[str]:
    """Every module a fresh interpreter imports for ``python -X importtime <args>``."""
    done = subprocess.run([sys.executable, "-X", "importtime", *python_args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60)
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert names, done.stderr[-2000:]
    return names


def heavy_in(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == h or n.startswith(h + ".") for h in HEAVY))


def test_import_rlmq_loads_no_worker_runtime() -> None:
    names = loaded_modules("-c", "import rlmq; rlmq.Client")
    assert "rlmq.client" in names
    assert heavy_in(names) == []


@pytest.mark.parametrize("command", [["--help"], ["status", "no-such-run"], ["list"], ["result", "no-such-run"],
                                     ["cancel", "no-such-run"], ["watch", "no-such-run", "--timeout", "1"],
                                     ["submit", "--help"], ["job", "list"], ["job", "status", "no-such-job"]])
def test_cli_commands_load_no_worker_runtime(command, tmp_path, redis_url) -> None:
    script = f"import sys\nfrom rlmq.cli import main\ntry:\n    main({command!r})\nexcept SystemExit:\n    pass"
    names = loaded_modules("-c", script, env=cli_env(tmp_path, REDIS_URL=redis_url), cwd=tmp_path)
    assert "rlmq.cli" in names
    assert heavy_in(names) == [], command


def test_the_settings_know_the_sandbox_backends_the_bridge_has() -> None:
    """rlmq may not import broker_bridge (it loads dspy), so the backend names live twice: kept equal here."""
    from broker_bridge.factory import BACKENDS
    from rlmq.settings import SandboxBackend

    assert [b.value for b in SandboxBackend] == list(BACKENDS)
