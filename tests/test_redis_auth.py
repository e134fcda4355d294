"""Redis requires a password everywhere rlmq starts one, and workers refuse an open remote one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psutil
import pytest
import redis

from rlmq.local_redis import PrivateRedis
from rlmq.redis_url import unauthenticated_redis_problem
from rlmq.stack import redacted_url, write_private
from tests.support.net import one_try_redis


def test_private_redis_refuses_clients_without_its_password(redis_server: PrivateRedis) -> None:
    assert redis_server.password and f":{redis_server.password}@" in redis_server.url
    with pytest.raises(redis.AuthenticationError):
        one_try_redis(port=redis_server.port).ping()
    with pytest.raises(redis.AuthenticationError):
        one_try_redis(port=redis_server.port, password="wrong").ping()
    assert redis.Redis.from_url(redis_server.url).ping()
    # The password is in a 0600 config file, not on the server's world-readable command line.
    assert redis_server.password not in " ".join(psutil.Process(redis_server.process.pid).cmdline())
    (conf,) = Path(redis_server.dir).glob("redis-*.conf")
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600


@pytest.mark.parametrize("url, refused", [
    ("redis://redis.example.com:6379/0", True),
    ("rediss://10.0.0.5:6380/0", True),
    ("redis://user@10.0.0.5:6379/0", True),
    ("redis://:pw@redis.example.com:6379/0", False),
    ("rediss://rlmq-worker:pw@redis.example.com:6380/0?ssl_cert_reqs=required", False),
    ("redis://redis.example.com:6379/0?password=pw", False),
    ("rediss://redis.example.com/0?ssl_certfile=/etc/rlmq/client.pem", False),
    ("redis://127.0.0.1:6379/0", False),
    ("redis://localhost:6379/0", False),
    ("redis://[::1]:6379/0", False),
    ("unix:///run/redis.sock", False),
])
def test_workers_refuse_a_remote_redis_without_a_password(url: str, refused: bool) -> None:
    assert (unauthenticated_redis_problem(url) is not None) is refused


def test_state_file_is_private_and_replaced_atomically(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    path = state_dir / "stack.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_private(path, '{"redis_url": "redis://:secret@127.0.0.1:1/0"}')
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert "secret" in path.read_text() and list(state_dir.iterdir()) == [path]
    fresh = tmp_path / "a" / "b" / "stack.json"
    write_private(fresh, "{}")
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700


def test_redacted_url_hides_the_password_only() -> None:
    assert redacted_url("redis://:s3cret@127.0.0.1:5/0") == "redis://:****@127.0.0.1:5/0"
    assert redacted_url("rediss://worker:s3cret@h:6380/0") == "rediss://worker:****@h:6380/0"
    assert redacted_url("redis://127.0.0.1:5/0") == "redis://127.0.0.1:5/0"
