"""ResponseCache single-flight and the Redis-backed dspy.cache, on real Redis, processes and HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Any

import pytest
import redis

from rlmq.store.keys import dspy_cache_key, inflight_key, response_cache_key
from tests.support.children import run_children
from tests.support.pickles import dotted_name_gadget, hostile_pickles
from tests.support.stub_llm import StubLLM, default_responder, post_chat
from tests.support.wait import wait_until
from workers.dspy_cache import install_redis_dspy_cache
from workers.single_flight import ResponseCache

REPO = Path(__file__).resolve().parents[1]
RESULTS, STARTED = "test:results", "test:started"  # test-only lists; not rlmq keys


def stored_bytes(client: redis.Redis, key: bytes) -> bytes:
    raw = client.get(key)
    assert isinstance(raw, bytes), key
    return raw


def _ask_stub(api_base: str, prompt: str) -> dict[str, Any]:
    return {"text": post_chat(api_base, prompt)["choices"][0]["message"]["content"]}


def _flight_worker(url: str, api_base: str, key: str, threads: int, barrier, worker: int) -> None:
    """Child process: `threads` threads ask the same key at once; results go to a Redis list."""
    client = redis.Redis.from_url(url)
    cache = ResponseCache(client, 60)

    def one(_: int) -> None:
        value, cached = cache.single_flight(
            key, lambda: _ask_stub(api_base, "the one prompt"), lock_ttl=10, wait_timeout=20
        )
        client.rpush(RESULTS, json.dumps({"worker": worker, "cached": cached, "text": value["text"]}))

    barrier.wait(30)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(threads)))


def _doomed_leader(url: str, key: str) -> None:
    """Child process: take the single-flight lock, say so, then hang until killed."""
    client = redis.Redis.from_url(url)

    def compute() -> dict[str, Any]:
        client.rpush(STARTED, "1")
        time.sleep(60)
        return {"never": True}

    ResponseCache(client, 60).single_flight(key, compute, lock_ttl=1.0, wait_timeout=5)


def test_key_for_is_canonical() -> None:
    messages = [{"role": "user", "content": "hi"}]
    a = ResponseCache.key_for("m", messages, {"temperature": 0.0, "max_tokens": 5, "api_key": "k1"})
    b = ResponseCache.key_for("m", messages, {"max_tokens": 5, "temperature": 0.0, "api_key": "k2"})
    assert a == b and len(a) == 64
    assert a != ResponseCache.key_for("m", messages, {"temperature": 0.7, "max_tokens": 5})
    assert a != ResponseCache.key_for("m2", messages, {"temperature": 0.0, "max_tokens": 5})


def test_fifty_concurrent_callers_in_two_processes_pay_once(
    redis_url: str, redis_client: redis.Redis, stub_llm: StubLLM, mp_context: ForkServerContext
) -> None:
    stub_llm.latency = 0.5
    barrier = mp_context.Barrier(2)
    run_children(mp_context, _flight_worker,
                 [(redis_url, stub_llm.api_base, "k" * 64, 25, barrier, i) for i in range(2)])
    results = [json.loads(raw) for raw in redis_client.lrange(RESULTS, 0, -1)]
    assert len(results) == 50
    assert stub_llm.request_count == 1
    assert sum(not r["cached"] for r in results) == 1
    assert {r["text"] for r in results} == {default_responder([{"role": "user", "content": "the one prompt"}], {})}
    assert redis_client.exists(response_cache_key("k" * 64))
    assert not redis_client.exists(inflight_key("k" * 64))


def test_a_flight_that_ended_after_the_look_up_is_not_paid_again(redis_client: redis.Redis) -> None:
    """A sub-task looks all its prompts up at once (one MGET), then asks the misses: a flight of another
    sub-task that ends in between leaves no lock behind, and taking the lock then paid for the prompt
    again (test_run_sight saw 30 prompts asked twice over 60 duplicated ones, 44 paid)."""
    cache, key = ResponseCache(redis_client, 60), "m" * 64
    assert cache.get_many([key]) == [None]  # this sub-task's look-up: a miss
    cache.single_flight(key, lambda: {"text": "the leader's"}, lock_ttl=5, wait_timeout=5)  # another's flight
    computes = []

    def compute() -> dict[str, Any]:
        computes.append(1)
        return {"text": "paid again"}

    value, cached = cache.single_flight(key, compute, lock_ttl=5, wait_timeout=5, known_miss=True)
    assert (value, cached, computes) == ({"text": "the leader's"}, True, [])


def test_error_result_is_shared_with_waiters_but_not_cached(redis_client: redis.Redis) -> None:
    cache = ResponseCache(redis_client, 60)
    computes = []

    def failing() -> dict[str, Any]:
        computes.append(1)
        time.sleep(0.3)
        return {"error": "upstream 500"}

    def call() -> tuple[dict[str, Any], bool]:
        return cache.single_flight("e" * 64, failing, lock_ttl=5, wait_timeout=5, cacheable=lambda v: "error" not in v)

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda _: call(), range(5)))
    assert len(computes) == 1
    assert all(value == {"error": "upstream 500"} for value, _ in results)
    assert cache.get("e" * 64) is None
    _, cached = call()  # the next caller tries again
    assert len(computes) == 2 and not cached


def test_exception_in_compute_hands_over_to_a_waiter(redis_client: redis.Redis) -> None:
    cache = ResponseCache(redis_client, 60)
    calls = []
    lock = threading.Lock()

    def compute() -> dict[str, Any]:
        with lock:
            calls.append(1)
            first = len(calls) == 1
        time.sleep(0.2)
        if first:
            raise RuntimeError("leader crashed")
        return {"text": "ok"}

    def call() -> Any:
        try:
            return cache.single_flight("x" * 64, compute, lock_ttl=5, wait_timeout=5)
        except RuntimeError as exc:
            return exc

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: call(), range(4)))
    assert len(calls) == 2
    assert sum(isinstance(o, RuntimeError) for o in outcomes) == 1
    assert sum(o == ({"text": "ok"}, False) for o in outcomes) == 1
    assert sum(o == ({"text": "ok"}, True) for o in outcomes) == 2


@pytest.mark.slow  # waits out a timeout: not for the fast lane
def test_dead_leader_is_taken_over_after_lock_ttl(
    redis_url: str, redis_client: redis.Redis, mp_context: ForkServerContext
) -> None:
    leader = mp_context.Process(target=_doomed_leader, args=(redis_url, "d" * 64))
    leader.start()
    try:
        # polled: a BLPOP longer than the client's socket timeout (redis-py 8: 5 s) fails on a slow start
        wait_until(lambda: redis_client.llen(STARTED) > 0, 30, "the leader took the lock")
    finally:
        leader.kill()  # SIGKILL: no finally blocks, the lock stays until its TTL
        leader.join(10)
    lock_left = redis_client.pttl(inflight_key("d" * 64)) / 1000
    assert 0 < lock_left <= 1.0
    started = time.monotonic()
    value, cached = ResponseCache(redis_client, 60).single_flight(
        "d" * 64, lambda: {"text": "rescued"}, lock_ttl=5, wait_timeout=5
    )
    waited = time.monotonic() - started
    assert (value, cached) == ({"text": "rescued"}, False)
    assert lock_left - 0.1 <= waited <= lock_left + 0.5  # woken by the lock's expiry


def test_waiting_gives_up_after_wait_timeout(redis_client: redis.Redis) -> None:
    redis_client.set(inflight_key("w" * 64), "someone-else", px=10_000)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="still computing"):
        ResponseCache(redis_client, 60).single_flight("w" * 64, dict, lock_ttl=5, wait_timeout=0.5)
    assert 0.45 <= time.monotonic() - started <= 1.5


# -- dspy.cache in Redis ----------------------------------------------------------------------

CHILD = """
import json, sys
import dspy, redis
from workers.dspy_cache import install_redis_dspy_cache
url, api_base, prompt = sys.argv[1:4]
install_redis_dspy_cache(redis.Redis.from_url(url), 3600)
lm = dspy.LM("openai/stub", api_base=api_base, api_key="stub", num_retries=0)
print(json.dumps(lm(prompt)))
"""


@pytest.fixture
def restore_dspy_cache() -> Iterator[None]:
    import dspy

    saved = dspy.cache
    yield
    dspy.cache = saved


def _lm(api_base: str, engine: str = "auto") -> Any:
    import dspy

    return dspy.LM("openai/stub", api_base=api_base, api_key="stub", engine=engine, num_retries=0)


@pytest.mark.usefixtures("restore_dspy_cache")
def test_dspy_cache_hits_are_shared_with_a_fresh_process(
    redis_url: str, redis_client: redis.Redis, stub_llm: StubLLM
) -> None:
    # A decode_responses client on purpose: the cache must still store bytes.
    install_redis_dspy_cache(redis.Redis.from_url(redis_url, decode_responses=True), 3600)
    prompt = f"cache me {time.time_ns()}"
    first = _lm(stub_llm.api_base)(prompt)
    assert stub_llm.request_count == 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, redis_url, stub_llm.api_base, prompt],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert json.loads(child.stdout.strip().splitlines()[-1]) == first
    assert stub_llm.request_count == 1  # the fresh process made no HTTP request


@pytest.mark.usefixtures("restore_dspy_cache")
def test_dspy_cache_round_trips_both_record_formats(redis_client: redis.Redis, stub_llm: StubLLM) -> None:
    # The native engine caches plain data (J + JSON); LiteLLM caches its ModelResponse, stored
    # as M + its JSON dump and rebuilt by its constructor. A fresh cache object has an empty
    # memory tier, so its hits come from Redis, as in another process. (Both engines share one
    # key for one request, hence a prompt each.)
    install_redis_dspy_cache(redis_client, 3600)
    prompts = {engine: f"both formats via {engine} {time.time_ns()}" for engine in ("auto", "litellm")}
    first = {engine: _lm(stub_llm.api_base, engine)(p) for engine, p in prompts.items()}
    assert stub_llm.request_count == 2
    raws = [stored_bytes(redis_client, k) for k in redis_client.scan_iter(match=dspy_cache_key("*"))]
    assert {raw[:1] for raw in raws} == {b"J", b"M"}
    assert all(json.loads(raw[1:]) for raw in raws)  # JSON, nothing else
    install_redis_dspy_cache(redis_client, 3600)
    again = {engine: _lm(stub_llm.api_base, engine)(p) for engine, p in prompts.items()}
    assert again == first
    assert stub_llm.request_count == 2


def test_the_dotted_name_gadget_is_live_against_dspys_restricted_unpickler(tmp_path: Path) -> None:
    # Why the cache must not unpickle at all: DSPy's allow-list trusts litellm.types.*, and
    # protocol 4 resolves "builtins.eval" inside such a module.
    import io

    from dspy.clients.disk_serialization import _restricted_load

    marker = tmp_path / "pwned"
    _restricted_load(io.BytesIO(dotted_name_gadget(marker)), frozenset())
    assert marker.exists()


@pytest.mark.parametrize("tag", [b"P", b"J", b"M", b"R", b""])
def test_dspy_cache_never_unpickles_and_bad_entries_are_misses(redis_client: redis.Redis, tmp_path: Path,
                                                                tag: bytes) -> None:
    from workers.dspy_cache import RedisDspyCache

    marker = tmp_path / "pwned"
    cache = RedisDspyCache(redis_client, 60)
    request = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    key = cache.cache_key(request)
    for planted in hostile_pickles(marker):
        redis_client.set(dspy_cache_key(key), tag + planted)
        assert cache.get(request) is None
        assert not marker.exists()
        assert not redis_client.exists(dspy_cache_key(key))  # the bad entry is dropped


@pytest.mark.parametrize("raw", [
    b'J{"_dspy_format": "dspy-lm15-result-v1", "responses": "junk"}', b'J["a", "list"]', b'J{"plain": 1}',
    b'M{"choices": "nope"}', b"M[]", b"J{not json", b'R{"output": 5}',
])
def test_dspy_cache_entries_of_the_wrong_shape_are_misses(redis_client: redis.Redis, raw: bytes) -> None:
    from workers.dspy_cache import RedisDspyCache

    cache = RedisDspyCache(redis_client, 60)
    request = {"model": "m", "messages": [{"role": "user", "content": "shape"}]}
    redis_client.set(dspy_cache_key(cache.cache_key(request)), raw)
    assert cache.get(request) is None


def test_dspy_cache_keeps_other_values_out_of_redis(redis_client: redis.Redis) -> None:
    from workers.dspy_cache import RedisDspyCache

    cache = RedisDspyCache(redis_client, 60)
    request = {"model": "m", "messages": [{"role": "user", "content": "set"}]}
    cache.put(request, {"a": (1, 2)})  # not a record DSPy's LM makes: memory tier only
    assert not redis_client.exists(dspy_cache_key(cache.cache_key(request)))
    assert cache.get(request) == {"a": (1, 2)}


@pytest.mark.parametrize("raw", [None, b"\x80\x04junk", b'"a string"', b'{"text": 5}', b'{"text": "ok", "usage": {"x": "1"}}'])
def test_response_cache_entries_of_the_wrong_shape_are_misses(redis_client: redis.Redis, tmp_path: Path,
                                                               raw: bytes | None) -> None:
    from workers.batch_answer import _cache_record

    marker = tmp_path / "pwned"
    cache = ResponseCache(redis_client, 60, valid=_cache_record)
    for planted in ([raw] if raw is not None else hostile_pickles(marker)):
        redis_client.set(response_cache_key("k" * 64), planted)
        assert cache.get("k" * 64) is None and cache.get_many(["k" * 64]) == [None]
    assert not marker.exists()
    cache.put("k" * 64, {"text": "fine", "usage": {"prompt_tokens": 1}, "cost": None, "model": "m"})
    hit = cache.get("k" * 64)
    assert hit is not None and hit["text"] == "fine"
