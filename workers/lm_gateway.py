"""One LM request through the fleet: the model's fleet-wide adaptive limiter, the LM client, retries.

Both kinds of call go through here: the prompts of ``llm_batch`` sub-tasks (``workers.batch_answer``)
and the root-LM calls of every run (``workers.engines``), so all requests to one model are one
fleet-wide stream. The limiter (``workers.adaptive_limit``) learns the provider's limit from its
replies, caps requests in flight and holds the fleet in the cooldown a 429's ``Retry-After`` sets;
failures are retried with jittered backoff, a 429 counting as a quarter of a retry.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlmq.settings import Settings
from rlmq.store.metrics import count_throttled
from workers.adaptive_limit import AdaptiveLimiter
from workers.llm_call import FailureKind, LMCallError, LMReply, Messages, call_lm
from workers.pricing import estimate_tokens
from workers.tracing import note_throttled

__all__ = [
    "RATE_MARGIN", "ROOT_CALL_DEADLINE_SECONDS", "SUBTASK_DEADLINE_SECONDS", "LMFailure",
    "fleet_limiter", "limited_call", "max_call_seconds",
]

logger = logging.getLogger(__name__)

# A sub-task stops starting new prompts after this long (the parent's gather timeout and the
# broker's visibility timeout are both larger); late prompts come back as errors.
SUBTASK_DEADLINE_SECONDS = 900.0
# A root-LM call stops waiting for the limiter and retrying after this long (then the run's step
# fails like any LM error); the run's own time limit usually ends it first.
ROOT_CALL_DEADLINE_SECONDS = 900.0
_MAX_BACKOFF = 20.0
_THROTTLED_RETRIES = 4  # 429s allowed per allowed retry (RLMQ_LM_RETRIES)
# The provider counts requests when they arrive, not when Redis grants them; grant-to-arrival
# delays vary by tens of ms, which can put one extra request into a provider's 1-s window.
RATE_MARGIN = 0.97


def fleet_limiter(client: Any, model: str, settings: Settings) -> AdaptiveLimiter:
    """The fleet's limiter for ``model``: learned from replies; the settings are optional ceilings.

    An explicit ``RLMQ_RATE_LIMIT_RPS`` is also where probing starts (the user said it is allowed).
    """
    ceiling = settings.rate_limit_rps * RATE_MARGIN if settings.rate_limit_rps else None
    return AdaptiveLimiter(client, model, ceiling_rps=ceiling, burst=settings.rate_limit_burst,
                           ceiling_tpm=settings.tokens_per_minute, max_in_flight=settings.max_in_flight,
                           lease_seconds=settings.lm_timeout + 30.0, initial_rps=ceiling or 10.0)


@dataclass(frozen=True)
class LMFailure:
    """A request given up after its retries: why, in one line (sandbox code sees ``[ERROR] <error>``)."""

    error: str


def limited_call(model: str, messages: Messages, settings: Settings, limiter: AdaptiveLimiter, *,
                 params: dict[str, Any], deadline: float,
                 on_throttled: Callable[[], None] | None = None) -> tuple[LMReply | LMFailure, int]:
    """One request through the fleet limiter and the LM, with retries: (the reply or the failure, attempts).

    ``on_throttled`` is called for each 429 (``rlmq stats`` counts them)."""
    estimate = estimate_tokens(messages) + int(params.get("max_tokens") or 0)
    failures = throttled = attempts = 0
    while True:
        attempts += 1
        slot = limiter.acquire(tokens=estimate, timeout=max(0.1, deadline - time.monotonic()))
        headers: dict[str, str] = {}
        try:
            reply = call_lm(model, messages, api_base=settings.lm_api_base, timeout=settings.lm_timeout,
                            params=params, client=settings.lm_client, headers_out=headers)
        except LMCallError as exc:
            limited = exc.kind is FailureKind.RATE_LIMITED
            slot.done(headers=headers, rate_limited=limited, failed=True)
            throttled, failures = throttled + limited, failures + (not limited)
            # A 429 is the limiter's business (the fleet pauses, the rate drops): it may retry
            # more often than a failure before the prompt is given up.
            if (exc.kind is FailureKind.PERMANENT or failures > settings.lm_retries
                    or throttled > _THROTTLED_RETRIES * settings.lm_retries):
                return LMFailure(f"{exc.kind.value} after {attempts} attempt(s): {exc}"), attempts
            if limited:
                # Pause the whole fleet; every worker's acquire() waits the cooldown out.
                pause = exc.retry_after if exc.retry_after is not None else _backoff(throttled - 1)
                limiter.cooldown(pause)
                count_throttled(limiter.redis, model)
                note_throttled(model)
                if on_throttled is not None:
                    on_throttled()
                logger.info("429 from %s: fleet cooldown %.2fs", model, pause)
            else:
                time.sleep(min(_backoff(failures - 1), max(0.0, deadline - time.monotonic())))
            continue
        except BaseException:
            slot.done(failed=True)
            raise
        slot.done(headers=headers, used_tokens=int(reply.usage.get("total_tokens") or 0) or None)
        return reply, attempts


def _backoff(attempt: int) -> float:
    return min(_MAX_BACKOFF, 0.25 * 2 ** attempt) * (0.5 + random.random())


def max_call_seconds(settings: Settings) -> float:
    """The longest one ``limited_call`` can take: every attempt, timeout and backoff (a single-flight
    leader may hold its lock this long)."""
    throttled = _THROTTLED_RETRIES * settings.lm_retries * _MAX_BACKOFF  # 429s: quick replies, then a pause
    return (settings.lm_retries + 1) * (settings.lm_timeout + _MAX_BACKOFF) + throttled + 30.0
