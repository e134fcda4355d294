"""The commands docker-compose.yml runs, run natively (no Docker engine here): each service of the
fleet starts from its exact compose command and does its job against a real Redis."""

from __future__ import annotations

import contextlib
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


def compose_command(service: str, file: str = "docker-compose.yml") -> list[str]:
    """The service's command as the container runs it (compose turns "$$" into "$")."""
    spec = yaml.safe_load((REPO / file).read_text())["services"][service]["command"]
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


def test_the_redis_host_file_makes_a_sentinel_deployment_that_fails_over(tmp_path):
    """deploy/compose.redis-host.yml's exact commands for three Redis hosts (here three loopback port
    pairs and three scratch dirs for /data): replication and Sentinels form, an rlmq client reaches the
    primary through its sentinel:// URL, and after the primary is killed it writes to the promoted one."""
    import subprocess

    import redis as redis_py

    from rlmq.redis_url import connect
    from tests.support.net import free_port
    from tests.support.wait import wait_until

    password, sentinel_password = "compose-redis-pw", "compose-sentinel-pw"
    hosts = [{"redis": free_port(), "sentinel": free_port()} for _ in range(3)]
    shared = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password, "REDISCLI_AUTH": password,
              "SENTINEL_PASSWORD": sentinel_password, "REDIS_PRIMARY_HOST": "127.0.0.1",
              "REDIS_PRIMARY_PORT": str(hosts[0]["redis"]), "SENTINEL_QUORUM": "2",
              "SENTINEL_DOWN_AFTER_MS": "1000", "SENTINEL_FAILOVER_TIMEOUT_MS": "3000"}
    processes: dict[tuple[int, str], subprocess.Popen] = {}

    def start(n: int, service: str) -> None:
        data = tmp_path / f"host{n}" / service
        data.mkdir(parents=True, exist_ok=True)
        env = {**shared, "REDIS_PORT": str(hosts[n]["redis"]), "SENTINEL_PORT": str(hosts[n]["sentinel"]),
               "REDIS_REPLICA_OF": "127.0.0.1" if n else ""}
        # bind to loopback here: on a host (network_mode: host) the servers listen on its addresses
        command = compose_command(service, "deploy/compose.redis-host.yml")
        command[-1] = command[-1] + " --bind 127.0.0.1"
        processes[(n, service)] = subprocess.Popen(command, env=env, cwd=data, stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL, start_new_session=True)

    def sentinel_view(port: int) -> dict:
        try:
            view = redis_py.Redis(port=port, password=sentinel_password, socket_timeout=2,
                                  decode_responses=True).sentinel_master("rlmq")
            return view if isinstance(view, dict) else {}
        except redis_py.RedisError:
            return {}

    try:
        for n in range(3):
            start(n, "redis")
        for n in range(3):
            start(n, "sentinel")
        wait_until(lambda: all(sentinel_view(h["sentinel"]).get("num-slaves") == 2 and
                               sentinel_view(h["sentinel"]).get("num-other-sentinels") == 2 for h in hosts),
                   60, "three Sentinels seeing two replicas and each other")
        conf = (tmp_path / "host1" / "sentinel" / "sentinel.conf")
        assert conf.stat().st_mode & 0o077 == 0, "the Sentinel's config holds both passwords: private"
        url = (f"sentinel://:{password}@127.0.0.1:{hosts[0]['sentinel']};"
               + ";".join(f"sentinel://127.0.0.1:{h['sentinel']}" for h in hosts[1:])
               + f"/0?master_name=rlmq&sentinel_password={sentinel_password}")
        client = connect(url, socket_timeout=5)
        assert client.set("compose-key", "before") and client.get("compose-key") == b"before"
        os.killpg(processes[(0, "redis")].pid, signal.SIGKILL)  # the primary's host is lost (sh and redis-server)

        def written() -> bool:
            try:
                return bool(client.set("compose-key", "after"))
            except redis_py.RedisError:
                return False

        wait_until(written, 60, "a write on the promoted replica", interval=0.5)
        # The Sentinels learn the promotion one after another: each names a replica within 30 s.
        replicas = (hosts[1]["redis"], hosts[2]["redis"])
        wait_until(lambda: all(int(sentinel_view(h["sentinel"]).get("port", 0)) in replicas for h in hosts),
                   30, "every Sentinel naming the promoted replica")
        assert client.get("compose-key") == b"after"
        # A Sentinel restarted on its volume follows the current primary, not the first one it was told.
        os.killpg(processes[(1, "sentinel")].pid, signal.SIGKILL)
        processes[(1, "sentinel")].wait(10)
        start(1, "sentinel")
        wait_until(lambda: int(sentinel_view(hosts[1]["sentinel"]).get("port", 0)) != hosts[0]["redis"]
                   and sentinel_view(hosts[1]["sentinel"]).get("port") is not None, 30, "the restarted Sentinel")
    finally:
        for process in processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
