"""The commands docker-compose.yml runs, run natively (no Docker engine here): each service of the
fleet starts from its exact compose command and does its job against a real Redis."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlmq.stack import LocalStack
from tests.support.cli import processes_with_cmdline
from tests.support.net import http_status, one_try_redis

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FLOWER_AUTH = "admin:compose-test-password"


def compose_command(service: str) -> list[str]:
    """The service's command as the container runs it (compose turns "$$" into "$")."""
    spec = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"][service]["command"]
    command = list(spec) if isinstance(spec, list) else shlex.split(spec)
    return [part.replace("$$", "$") for part in command]


def wait_for_log(child, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while text not in child.log_path.read_text(errors="replace"):
        assert child.alive, f"{child.name} exited:\n{child.log_tail()}"
        assert time.monotonic() < deadline, f"{child.name} never logged {text!r}:\n{child.log_tail()}"
        time.sleep(0.2)




@pytest.fixture
def stack(redis_url, tmp_path):
    env = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(REPO), "RLMQ_LM": "openai/compose-check", "FLOWER_BASIC_AUTH": FLOWER_AUTH,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    stack = LocalStack(redis_url=redis_url, flower_port=None, env=env, log_dir=tmp_path)
    yield stack
    stack.stop(grace=5)


def test_compose_services_start_from_their_exact_commands(stack, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # beat writes its schedule file; nothing may land in the repo
    workers = [stack.spawn(name, compose_command(name)) for name in ("rlm-worker", "llm-worker")]
    beat = stack.spawn("beat", compose_command("beat"))
    flower = stack.spawn("flower", compose_command("flower"))
    stack.wait_ready(workers)
    wait_for_log(beat, "beat: Starting")
    deadline = time.monotonic() + 60
    while http_status("http://127.0.0.1:5555/") == 0:
        assert flower.alive, flower.log_tail()
        assert time.monotonic() < deadline, flower.log_tail()
        time.sleep(0.3)
    assert http_status("http://127.0.0.1:5555/") == 401  # basic auth from FLOWER_BASIC_AUTH
    assert http_status("http://127.0.0.1:5555/", FLOWER_AUTH) == 200
    assert all(child.alive for child in stack.children)


def test_compose_redis_requires_its_password(tmp_path):
    """The redis service's exact command (plus a free port and a scratch dir), run natively."""
    import socket
    import subprocess

    import redis as redis_py

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sh, dash_c, script = compose_command("redis")
    assert (sh, dash_c) == ("sh", "-c")
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": "compose-redis-pw", "REDISCLI_AUTH": "compose-redis-pw"}
    # Its own session: the command is a shell pipeline, and redis-server must go with the shell.
    server = subprocess.Popen([sh, dash_c, f"{script} --port {port} --bind 127.0.0.1 --dir {tmp_path}"],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        authed = redis_py.Redis(port=port, password="compose-redis-pw", socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert authed.ping()
                break
            except redis_py.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, "redis did not start"
                time.sleep(0.1)
        with pytest.raises(redis_py.AuthenticationError):
            one_try_redis(port=port).ping()
        cmdlines = processes_with_cmdline(str(port)).values()
        assert any("redis-server" in c for c in cmdlines) and not any("compose-redis-pw" in c for c in cmdlines)
        health = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["redis"]["healthcheck"]["test"]
        probe = health[1].replace("redis-cli", f"redis-cli -p {port}")
        assert subprocess.run(["sh", "-c", probe], env=env).returncode == 0
        assert subprocess.run(["sh", "-c", probe], env={"PATH": os.environ["PATH"]}).returncode != 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
