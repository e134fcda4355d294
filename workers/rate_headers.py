"""What a provider's reply says about its rate limit, read from the reply's headers.

Three formats (header names case-insensitive; LiteLLM's ``llm_provider-`` prefix is stripped):

- OpenAI and OpenAI-compatible servers (Groq, Together, vLLM behind proxies...):
  ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, reset a duration (``"6m0s"``,
  ``"1.5s"``, ``"20ms"``) until the bucket is full again;
- Anthropic: ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``, limits per
  minute (a token bucket refilled continuously, per Anthropic's docs), reset an RFC 3339 time;
- OpenRouter: ``x-ratelimit-{limit,remaining,reset}``, reset a Unix time in milliseconds.

The window of an OpenAI-style limit is not stated (RPM for OpenAI, per day for Groq's request
limit), so the refill rate is inferred: a bucket of ``limit`` that is ``reset`` seconds from
full has lost ``limit - remaining`` (floored by the provider, so really between ``n - 1`` and
``n``) requests' worth, at ``rate`` per second. Each reply thus bounds the rate:
``(n - 1) / (reset + r) <= rate <= n / (reset - r)`` with ``r`` the reset's rounding. The limiter
keeps the tightest bounds it has seen (``workers.adaptive_limit``).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Bounds", "RateInfo", "parse_duration", "parse_rate_headers"]

_PREFIX = "llm_provider-"
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True)
class Bounds:
    """What one reply says about one limit's refill rate (per second)."""

    low: float  # the rate is at least this (0: unknown)
    high: float  # ...and at most this (math.inf: unknown)
    limit: float  # the bucket size the provider stated (a change means a new limit)
    remaining: float

    @classmethod
    def exact(cls, rate: float, limit: float, remaining: float) -> Bounds:
        return cls(rate, rate, limit, remaining)

    @property
    def headroom(self) -> float:
        """Fraction of the bucket still available (1.0 = untouched)."""
        return self.remaining / self.limit if self.limit > 0 else 0.0


@dataclass(frozen=True)
class RateInfo:
    source: str  # "openai" | "anthropic" | "openrouter"
    requests: Bounds | None
    tokens: Bounds | None


def parse_duration(raw: str) -> tuple[float, float] | None:
    """An OpenAI reset duration as (seconds, rounding): ``"1m30.5s"`` -> (90.5, 0.05)."""
    text = raw.strip().lower()
    try:  # some compatible servers send plain seconds
        value = float(text)
        return (value, _rounding(text)) if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    number, unit = parts[-1]
    return seconds, _rounding(number) * _UNIT_SECONDS[unit]


def _rounding(number: str) -> float:
    """Half the last digit's value: ``"20"`` -> 0.5, ``"1.25"`` -> 0.005."""
    decimals = len(number.split(".", 1)[1]) if "." in number else 0
    return 0.5 * 10.0 ** -decimals


def _normalise(headers: Any) -> dict[str, str]:
    items = headers.items() if hasattr(headers, "items") else headers or ()
    out: dict[str, str] = {}
    for name, value in items:
        key = str(name).lower()
        if key.startswith(_PREFIX):
            key = key[len(_PREFIX):]
        out.setdefault(key, str(value).strip())
    return out


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _bucket_bounds(limit: float, remaining: float, reset: float, rounding: float) -> Bounds | None:
    """Bounds on the refill rate of a bucket of ``limit``, ``reset`` seconds from full."""
    if limit <= 0 or remaining > limit:
        return None
    used = limit - remaining
    if used <= 0:
        return Bounds(0.0, math.inf, limit, remaining)  # full: headroom, but nothing about the rate
    low = (used - 1) / (reset + rounding) if used > 1 else 0.0
    high = used / (reset - rounding) if reset > rounding else math.inf
    return Bounds(low, high, limit, remaining)


def _openai(h: Mapping[str, str], unit: str) -> Bounds | None:
    limit = _number(h.get(f"x-ratelimit-limit-{unit}"))
    remaining = _number(h.get(f"x-ratelimit-remaining-{unit}"))
    reset = parse_duration(h[f"x-ratelimit-reset-{unit}"]) if f"x-ratelimit-reset-{unit}" in h else None
    if limit is None or remaining is None or reset is None:
        return None
    return _bucket_bounds(limit, remaining, reset[0], reset[1])


def _anthropic(h: Mapping[str, str], unit: str) -> Bounds | None:
    limit = _number(h.get(f"anthropic-ratelimit-{unit}-limit"))
    remaining = _number(h.get(f"anthropic-ratelimit-{unit}-remaining"))
    if limit is None or limit <= 0:
        return None
    return Bounds.exact(limit / 60.0, limit, remaining if remaining is not None else limit)


def _openrouter(h: Mapping[str, str], now: float) -> Bounds | None:
    limit = _number(h.get("x-ratelimit-limit"))
    remaining = _number(h.get("x-ratelimit-remaining"))
    reset_at = _number(h.get("x-ratelimit-reset"))
    if limit is None or remaining is None or reset_at is None:
        return None
    seconds = reset_at / 1000.0 if reset_at > 1e11 else reset_at  # ms (OpenRouter) or s since epoch
    # An absolute time is read after the reply travelled and against another clock: allow 50 ms.
    return _bucket_bounds(limit, remaining, max(0.0, seconds - now), 0.05)


def parse_rate_headers(headers: Any, now: float | None = None) -> RateInfo | None:
    """The limit a reply states, or None when it states none (a mapping or (name, value) pairs)."""
    if not headers:
        return None
    h = _normalise(headers)
    if "x-ratelimit-limit-requests" in h or "x-ratelimit-limit-tokens" in h:
        return RateInfo("openai", _openai(h, "requests"), _openai(h, "tokens"))
    if "anthropic-ratelimit-requests-limit" in h or "anthropic-ratelimit-tokens-limit" in h:
        return RateInfo("anthropic", _anthropic(h, "requests"), _anthropic(h, "tokens"))
    if "x-ratelimit-limit" in h:
        return RateInfo("openrouter", _openrouter(h, time.time() if now is None else now), None)
    return None

