"""Hostile code against the local sandbox (issue #7): the attack suite of tests/support/attacks.py.

Each run starts a host process the way a worker runs: the canary as ``OPENAI_API_KEY`` in its
initial environment, and in a ``.env`` in its cwd and in its home (loaded with python-dotenv, as the
settings do). That host starts a victim sandbox and an attacker sandbox and runs every attack; the
test checks the outcomes. As root and, through ``setpriv``, as uid 65534.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import urllib.parse
from pathlib import Path

import pytest

from tests.support.attacks import ATTACKS, CANARY_PREFIX, Target
from tests.support.nobody import needs_nobody_readable_checkout
from tests.support.sandboxes import needs_namespaces

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
SETPRIV = shutil.which("setpriv")
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = needs_namespaces


def _arena(owner: int) -> tuple[Path, str]:
    """A worker's world under /tmp: cwd and home with a .env each, a world-writable dir, the canary."""
    canary = CANARY_PREFIX + secrets.token_hex(16)
    root = Path(tempfile.mkdtemp(prefix="rlmq-arena-"))
    for name in ("cwd", "home", "outside", "plant"):
        (root / name).mkdir()
    for name in ("cwd", "home"):
        env_file = root / name / ".env"
        env_file.write_text(f"OPENAI_API_KEY={canary}\nRLMQ_LM_API_KEY={canary}\n")
        env_file.chmod(0o600)
    (root / "outside").chmod(0o777)
    (root / "plant").chmod(0o777)
    for path in [root, *root.rglob("*")]:
        os.chown(path, owner, owner)
    root.chmod(0o755)
    return root, canary


def run_suite(redis_url: str, listener_port: int, *, as_nobody: bool = False,
              isolation: str = "namespaces") -> dict[str, dict]:
    owner = NOBODY if as_nobody else os.getuid()
    root, canary = _arena(owner)
    escape = f"/tmp/rlmq-escape-{secrets.token_hex(6)}"
    redis_port = urllib.parse.urlsplit(redis_url).port
    assert redis_port is not None
    target = Target(
        host_cwd=str(root / "cwd"), host_home=str(root / "home"),
        redis_port=redis_port, listener_port=listener_port,
        write_targets=[str(root / "outside" / "pwned"), str(root / "cwd" / "pwned"), escape],
        plant_dir=str(root / "plant"), secret_canary=canary,
    )
    python, path = sys.executable, [str(REPO)]
    prefix: list[str] = []
    if as_nobody:  # /root (pyenv, the venv's interpreter) is not traversable for uid 65534
        assert SETPRIV is not None
        python, prefix = SYSTEM_PYTHON, [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        path.append(sysconfig.get_paths()["purelib"])
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root / "home"), "PYTHONPATH": ":".join(path),
        "OPENAI_API_KEY": canary, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    spec = json.dumps({**{k: v for k, v in vars(target).items() if not k.startswith("victim_")},
                       "isolation": isolation})
    try:
        result = subprocess.run([*prefix, python, "-m", "tests.support.attacks"], input=spec, cwd=root / "cwd",
                                env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        outcomes = {o["name"]: o for o in json.loads(result.stdout.strip().splitlines()[-1])}
        assert not Path(escape).exists() or "write_outside" in outcomes
        return outcomes
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if os.path.exists(escape):
            os.unlink(escape)


def assert_every_attack_failed(outcomes: dict[str, dict]) -> None:
    assert {a.name for a in ATTACKS} | {"victim_survived", "isolation"} == set(outcomes)
    assert outcomes["isolation"]["verdict"]["mode"] == "namespaces"
    succeeded = {name: o["evidence"] for name, o in outcomes.items() if o["evidence"]}
    assert not succeeded, f"attacks that got through: {succeeded}"
    # The attacks did look: these numbers would be zero if the snippets had not run.
    assert outcomes["walk_filesystem"]["verdict"]["files"] > 100
    assert 1 <= outcomes["count_processes"]["verdict"]["count"] <= 6
    assert outcomes["broker_token"]["verdict"]["words"] > 10


def test_every_attack_fails_as_root(redis_server, listener):
    assert_every_attack_failed(run_suite(redis_server.url, listener))


@needs_nobody_readable_checkout
@pytest.mark.skipif(os.geteuid() != 0 or not SETPRIV, reason="needs root and setpriv to become uid 65534")
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"no {SYSTEM_PYTHON} for uid 65534")
def test_every_attack_fails_as_an_unprivileged_user(redis_server, listener):
    system = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                            capture_output=True, text=True).stdout.strip()
    if system != str(sys.version_info[:2]):
        pytest.skip(f"{SYSTEM_PYTHON} is Python {system}, the venv's packages are for {sys.version_info[:2]}")
    assert_every_attack_failed(run_suite(redis_server.url, listener, as_nobody=True))


@pytest.mark.slow  # ~25 s: the filesystem walk spends its whole 20 s budget on the host's filesystem
def test_the_suite_catches_a_sandbox_that_is_no_boundary(redis_server, listener):
    """The same suite with isolation "process" (plain subprocesses): the file-read, network,
    write and process attacks must succeed there, so the suite can fail and the tests above mean
    something."""
    outcomes = run_suite(redis_server.url, listener, isolation="process")
    assert outcomes["isolation"]["verdict"]["mode"] == "process"
    got_through = {name for name, o in outcomes.items() if o["evidence"]}
    # symlink_plant is not among them: the host writes without following links in both modes.
    expected = {"host_cwd_and_home", "redis", "loopback_listener", "loopback_scan", "write_outside",
                "count_processes", "other_sandbox"}
    assert expected <= got_through, {name: outcomes[name]["verdict"] for name in expected - got_through}
