"""Answering one chunk of prompts: what the ``llm_batch`` sub-task (``tasks.llm_batch``) does.

The chunk's prompts are looked up in the fleet's Redis response cache at once (one ``MGET``); the
misses are answered at once, on this process's prompt threads, each with single-flight (one paid call
per distinct prompt, fleet-wide), then ``workers.lm_gateway`` (the fleet-wide adaptive limiter, which
caps the requests in flight, and retries with backoff on 429/5xx/timeouts/bad replies). A prompt
that still fails comes back as an :class:`~workers.llm_call.Answer` with ``error`` set: data,
never an exception, so one bad prompt cannot fail the chunk. Answers carry usage, cost and the
serving worker's hostname.

Redis trouble (a restart, a failover) is not the prompt's fault: the shared client waits it out
(``workers.context``), and an answer already paid for is returned even if it could not be cached,
so an outage turns into latency, not into ``[ERROR]`` answers.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

import redis

from rlmq.run_options import model_allowed, with_options
from rlmq.settings import Settings, SettingsError
from workers.adaptive_limit import AdaptiveLimiter
from workers.answer import Answer
from workers.context import redis_client, worker_settings
from workers.llm_call import LMReply, prompt_messages
from workers.lm_gateway import SUBTASK_DEADLINE_SECONDS, LMFailure, fleet_limiter, limited_call, max_call_seconds
from workers.log_format import error_text
from workers.monitor import count
from workers.single_flight import ResponseCache
from workers.tracing import describe_answer, subtask_span

__all__ = ["answer_batch", "answer_prompt", "use_prompt_threads"]

logger = logging.getLogger(__name__)

_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)



def answer_batch(prompts: list[Any], model: str, options: dict[str, Any] | None, params: dict[str, Any] | None,
                 *, worker: str, traceparent: str | None = None) -> list[dict[str, Any]]:
    """Answer ``prompts`` (strings or chat-message lists) with ``model``; one answer dict each, in order.

    ``options`` are per-run settings overrides (``lm_api_base``, rate limits, cache TTL,
    ``lm_timeout``, ``lm_retries``); ``params`` are sampling parameters sent to the model.
    """
    refused = _refusal(model, options, params)
    if refused:  # checked again here: anyone who can enqueue llm_batch can choose these arguments
        logger.warning("llm_batch refused: %s", refused)
        return [Answer(error=refused, worker=worker).to_json_dict() for _ in prompts]
    settings = with_options(worker_settings(), options)
    client = redis_client()
    cache = ResponseCache(client, ttl_seconds=settings.cache_ttl_seconds, valid=_cache_record)
    limiter = fleet_limiter(client, model, settings)
    deadline = time.monotonic() + SUBTASK_DEADLINE_SECONDS
    params = params or {}
    keys, hits = _look_up(cache, model, prompts, params)
    with subtask_span(traceparent, len(prompts), model, worker) as prompt_span:

        def one(prompt: Any, key: str | None, hit: dict[str, Any] | None) -> Answer:
            def answer_it() -> Answer:
                if hit is not None and "error" not in hit:
                    return _answer(hit, cached=True, worker=worker, attempts=0)
                if time.monotonic() > deadline:
                    return Answer(error="sub-task deadline passed before this prompt was tried", worker=worker)
                return answer_prompt(prompt, model, settings, cache, limiter, params=params,
                                     worker=worker, deadline=deadline, key=key)

            return _in_prompt_span(prompt_span, hit is not None and "error" not in hit, answer_it)

        # A sub-task's prompts go at once: one after the other, each one's Redis round trips and LM
        # call waited for the previous prompt's, and at 40 ms per round trip that bounded a fan-out
        # (docs/reliability.md). Each runs in a copy of this thread's context, so its span is the
        # sub-task's child and its log lines name the run. A prompt repeated within the sub-task is
        # asked once and its copies are answered as a single-flight waiter is (cached).
        first: dict[str, Future[Answer]] = {}
        asked: list[tuple[Future[Answer], bool]] = []
        for prompt, key, hit in zip(prompts, keys, hits, strict=True):
            if key is not None and key in first:
                asked.append((first[key], True))
                continue
            future = _prompt_pool().submit(contextvars.copy_context().run, one, prompt, key, hit)
            if key is not None:
                first[key] = future
            asked.append((future, False))

        def copy_of(answer: Answer) -> Answer:
            copied = replace(answer, cached=True, attempts=0) if answer.ok else answer
            return _in_prompt_span(prompt_span, copied.cached, lambda: copied)

        answers = []
        for future, copy in asked:
            answer = _result(future, worker)
            answers.append(copy_of(answer) if copy else answer)
    return [a.to_json_dict() for a in answers]


def _in_prompt_span(prompt_span: Callable[..., AbstractContextManager[Any]], cached: bool,
                    answer_it: Callable[[], Answer]) -> Answer:
    """``answer_it()`` inside a prompt's span (``tracing.subtask_span``), its outcome described on it."""
    with prompt_span(cached=cached) as span:
        answer = answer_it()
        if span is not None:  # None: tracing is off
            describe_answer(span, answer)
    return answer


def _result(future: Future[Answer], worker: str) -> Answer:
    try:
        return future.result()
    except Exception as exc:  # answer_prompt never raises; a span's exporter might
        logger.warning("prompt failed outside the LM call: %s", error_text(exc))
        return Answer(error=f"{type(exc).__name__}: {exc}", worker=worker)


_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None
_prompt_threads: int | None = None  # the llm worker's concurrency (use_prompt_threads, at its start)


def use_prompt_threads(n: int) -> None:
    """Answer at most ``n`` prompts at once in this process: a threads-pool llm worker's ``-c``. Its
    sub-tasks' prompts go at once but share these threads, so ``-c`` still bounds the worker's requests
    in flight, as when each thread asked one prompt at a time: 128 a process (RLMQ_MAX_IN_FLIGHT) made
    the first burst to a provider whose limit is not known yet, and the GIL's delay in reading its
    reset headers, throttle 3-40 % of requests in ``bench/ratelimit.py`` (docs/ARCHITECTURE.md)."""
    global _prompt_threads
    _prompt_threads = max(1, n)


def _prompt_pool() -> ThreadPoolExecutor:
    """This process's threads answering prompts, shared by its sub-tasks: the worker's concurrency
    (``use_prompt_threads``), at most RLMQ_MAX_IN_FLIGHT (the fleet's limiter never lets more
    requests of a model be in flight); kept so their kept-alive LM connections
    (``workers.llm_call``) are reused."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():  # a forked child gets threads of its own
            cap = max(1, worker_settings().max_in_flight)
            size = min(cap, _prompt_threads or cap)
            _pool = (os.getpid(), ThreadPoolExecutor(max_workers=size, thread_name_prefix="rlmq-prompt"))
        return _pool[1]


# What a sub-call may pass to the model: sampling only. Anything else (api_base, api_key, headers,
# a provider override...) could send the provider key somewhere the operator did not configure.
SAMPLING_PARAMS = frozenset({"temperature", "max_tokens", "max_completion_tokens", "top_p", "seed", "stop", "n",
                             "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
                             "response_format", "reasoning_effort"})


def _refusal(model: str, options: dict[str, Any] | None, params: dict[str, Any] | None) -> str | None:
    """Why this worker's pins refuse the sub-call, or None (the same check a run makes at its start)."""
    base = worker_settings()
    try:
        settings = with_options(base, options)
    except SettingsError as exc:
        return str(exc)
    if model != settings.effective_sub_lm and not model_allowed(base, model):
        return f"model {model!r} is not allowed by this worker's settings (RLMQ_ALLOWED_MODELS)"
    extra = sorted(set(params or {}) - SAMPLING_PARAMS)
    if extra:
        return f"parameter(s) {', '.join(extra)} may not be set by a sub-call (sampling parameters only)"
    return None


def _cache_record(value: dict[str, Any]) -> bool:
    """A cached reply, or a failure handed to waiters in a wake-up; anything else from Redis is a miss."""
    return LMReply.is_record(value) or (set(value) == {"error"} and isinstance(value["error"], str))


def _look_up(cache: ResponseCache, model: str, prompts: list[Any],
             params: dict[str, Any]) -> tuple[list[str | None], list[dict[str, Any] | None]]:
    """Cache keys and cached values of a whole sub-task in one round trip; on any trouble, all
    misses (each prompt then meets the trouble itself and reports it as its answer)."""
    try:
        keys = [cache.key_for(model, prompt_messages(p), params) for p in prompts]
        return list(keys), cache.get_many(keys)
    except Exception as exc:
        logger.warning("batch cache look-up failed: %s", error_text(exc))
        return [None] * len(prompts), [None] * len(prompts)


def _answer(value: dict[str, Any], *, cached: bool, worker: str, attempts: int) -> Answer:
    if "error" in value:
        return Answer(error=str(value["error"]), worker=worker, attempts=attempts)
    reply = LMReply.from_json_dict(value)
    return Answer(text=reply.text, cached=cached, usage=reply.usage, cost=reply.cost, worker=worker, attempts=attempts)


def answer_prompt(prompt: Any, model: str, settings: Settings, cache: ResponseCache, limiter: AdaptiveLimiter,
                  *, params: dict[str, Any], worker: str, deadline: float, key: str | None = None) -> Answer:
    """One prompt through cache -> single-flight -> rate limit -> LM with retries; never raises."""
    attempts = 0
    paid: dict[str, Any] = {}  # the reply once the LM gave it: returned even if Redis then fails

    def compute() -> dict[str, Any]:
        """The reply as a dict, or ``{"error": ...}`` (handed to concurrent askers, never cached)."""
        nonlocal attempts
        if paid:
            return paid
        reply, attempts = limited_call(model, prompt_messages(prompt), settings, limiter, params=params,
                                       deadline=deadline, on_throttled=lambda: count(cache.redis, [("ratelimited", 1)]))
        if isinstance(reply, LMFailure):
            return {"error": reply.error}
        value = reply.to_json_dict()
        paid.update(value)
        return value

    known_miss = key is not None  # llm_batch looked the batch up already
    try:
        key = key or cache.key_for(model, prompt_messages(prompt), params)
        value, cached = cache.single_flight(key, compute, lock_ttl=max_call_seconds(settings),
                                            wait_timeout=max(1.0, deadline - time.monotonic()),
                                            cacheable=lambda v: "error" not in v, known_miss=known_miss)
        return _answer(value, cached=bool(cached), worker=worker, attempts=attempts)
    except _REDIS_ERRORS as exc:  # Redis away for longer than the client waits it out (workers.context)
        if paid:  # the LM answered; only caching it failed
            logger.warning("answer not cached (Redis unavailable: %s)", error_text(exc))
            return _answer(paid, cached=False, worker=worker, attempts=attempts)
        return Answer(error=f"Redis unavailable: {exc}", worker=worker, attempts=attempts)
    except Exception as exc:  # the limiter or a waiter timing out: still an answer
        logger.warning("prompt failed outside the LM call: %s", error_text(exc))
        return Answer(error=f"{type(exc).__name__}: {exc}", worker=worker, attempts=attempts)
