"""Every worker process is non-dumpable: as uid 65534, another process of the same uid cannot read
the ``/proc/<pid>/environ`` (provider key, Redis password) of the rlm worker, its prefork child,
or the llm worker — while it can read that of an ordinary process of that uid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import psutil
import pytest

from rlmq.stack import LocalStack, worker_command
from tests.support.nobody import needs_nobody_readable_checkout
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
SETPRIV = shutil.which("setpriv")
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter is under /root, closed to uid 65534
CANARY = "sk-canary-hardening-0123456789"

pytestmark = [
    pytest.mark.slow,
    needs_nobody_readable_checkout,
    pytest.mark.skipif(os.geteuid() != 0 or not SETPRIV, reason="needs root and setpriv to become uid 65534"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"no {SYSTEM_PYTHON} for uid 65534"),
]
AS_NOBODY = [SETPRIV or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

PROBE = """
import json, sys
out = {}
for pid in sys.argv[1:]:
    try:
        out[pid] = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
    except OSError as exc:
        out[pid] = type(exc).__name__
print(json.dumps(out))
"""


def test_workers_environ_is_unreadable_to_their_own_uid(redis_server, tmp_path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    path = [str(REPO), sysconfig.get_paths()["purelib"], str(REPO / "tests" / "support" / "nobody_path")]
    env = {"HOME": str(home), "PYTHONPATH": os.pathsep.join(path), "RLMQ_LM": "openai/hardening-check",
           "OPENAI_API_KEY": CANARY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    stack = LocalStack(redis_url=redis_server.url, flower_port=None, log_dir=tmp_path, env=env)
    try:
        children = [
            stack.spawn("rlm", [*AS_NOBODY, SYSTEM_PYTHON, *worker_command("rlm", name="hard-rlm", concurrency=1,
                                                                            pool="prefork")[1:]]),
            stack.spawn("llm", [*AS_NOBODY, SYSTEM_PYTHON, *worker_command("llm", name="hard-llm", concurrency=2,
                                                                            pool="threads")[1:]]),
        ]
        stack.wait_ready(children, timeout=120)
        rlm_main, llm_main = (c.process.pid for c in children)  # setpriv execs: same pid
        (rlm_child,) = (child.pid for child in psutil.Process(rlm_main).children())
        bystander = subprocess.Popen([*AS_NOBODY, "sleep", "60"], env={"OPENAI_API_KEY": CANARY})
        wait_until(lambda: psutil.Process(bystander.pid).cmdline()[:1] == ["sleep"], 10, "setpriv to exec sleep",
                   interval=0.01)
        try:
            targets = {"rlm main": rlm_main, "rlm child": rlm_child, "llm worker": llm_main, "bystander": bystander.pid}
            assert {name: psutil.Process(pid).uids().real for name, pid in targets.items()} == dict.fromkeys(targets, NOBODY)
            probe = subprocess.run([*AS_NOBODY, SYSTEM_PYTHON, "-c", PROBE,
                                    *map(str, targets.values())], capture_output=True, text=True, timeout=60,
                                   env={"HOME": str(home)})
            assert probe.returncode == 0, probe.stderr
            seen = {name: json.loads(probe.stdout)[str(pid)] for name, pid in targets.items()}
        finally:
            bystander.kill()
            bystander.wait()
        assert CANARY in seen["bystander"], "the probe could not read an ordinary process of its uid"
        for name in ("rlm main", "rlm child", "llm worker"):
            assert seen[name] == "PermissionError", (name, seen[name][:80])
        assert all(c.alive for c in stack.children)
    finally:
        stack.stop(grace=5)
