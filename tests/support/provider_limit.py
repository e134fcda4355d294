"""A provider's rate limit as the stub LLM enforces and states it (stdlib only: CI runs the stub
before installing anything).

Requests: a token bucket holding one second's worth (``rps``), refilled continuously, as
OpenAI and Anthropic describe theirs. Tokens (optional): a bucket of ``tpm``, refilled per
minute, charged with each reply's actual usage. Replies state the state of both buckets in
OpenAI's, Anthropic's (per-minute numbers) or OpenRouter's header format.
"""

from __future__ import annotations

import time

__all__ = ["ProviderLimit", "full_window", "openai_duration"]


class ProviderLimit:
    """A provider's limit: token buckets of requests (``rps``, one second deep) and, optionally,
    tokens (``tpm``, one minute deep). Not thread-safe: the stub calls it under its lock."""

    FORMATS = ("openai", "anthropic", "openrouter", None)

    def __init__(self, rps: float, *, headers: str | None = "openai", tpm: int | None = None) -> None:
        if headers not in self.FORMATS:
            raise ValueError(f"headers must be one of {self.FORMATS}")
        self.rps, self.headers, self.tpm = float(rps), headers, tpm
        self.capacity = max(1.0, self.rps)
        self.tokens = self.capacity
        self.tpm_left = float(tpm or 0)
        self.at = time.monotonic()

    def _refill(self, now: float) -> None:
        elapsed, self.at = now - self.at, now
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rps)
        if self.tpm:
            self.tpm_left = min(float(self.tpm), self.tpm_left + elapsed * self.tpm / 60.0)

    def admit(self, now: float) -> float:
        """Take one request; 0.0 if admitted, else the seconds until one would be."""
        self._refill(now)
        waits = []
        if self.tokens < 1.0:
            waits.append((1.0 - self.tokens) / self.rps)
        if self.tpm and self.tpm_left < 1.0:
            waits.append((1.0 - self.tpm_left) * 60.0 / self.tpm)
        if waits:
            return max(max(waits), 1e-3)
        self.tokens -= 1.0
        return 0.0

    def charge(self, used_tokens: int) -> None:
        if self.tpm:
            self.tpm_left -= used_tokens  # may go negative: the next requests wait it out

    def reply_headers(self, now: float) -> dict[str, str]:
        """The limit state in the chosen provider's header format."""
        self._refill(now)
        rows = [("requests", self.capacity, self.tokens, (self.capacity - self.tokens) / self.rps)]
        if self.tpm:
            rows.append(("tokens", float(self.tpm), max(0.0, self.tpm_left),
                         (self.tpm - max(0.0, self.tpm_left)) * 60.0 / self.tpm))
        out: dict[str, str] = {}
        for unit, limit, left, full_in in rows:
            if self.headers == "openai":
                out[f"x-ratelimit-limit-{unit}"] = str(int(limit))
                out[f"x-ratelimit-remaining-{unit}"] = str(int(left))
                out[f"x-ratelimit-reset-{unit}"] = openai_duration(full_in)
            elif self.headers == "anthropic":  # Anthropic states per-minute limits
                per_minute = limit * 60.0 / full_window(unit)
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + full_in))
                out[f"anthropic-ratelimit-{unit}-limit"] = str(int(per_minute))
                out[f"anthropic-ratelimit-{unit}-remaining"] = str(int(per_minute * left / limit))
                out[f"anthropic-ratelimit-{unit}-reset"] = stamp
            elif self.headers == "openrouter" and unit == "requests":
                out["X-RateLimit-Limit"] = str(int(limit))
                out["X-RateLimit-Remaining"] = str(int(left))
                out["X-RateLimit-Reset"] = str(int((time.time() + full_in) * 1000))
        return out


def full_window(unit: str) -> float:
    """Seconds a full bucket lasts: one for requests, sixty for tokens (a per-minute budget)."""
    return 1.0 if unit == "requests" else 60.0


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: ``"6m0s"``, ``"1.5s"``, ``"20ms"``."""
    if seconds < 1.0:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes)}m{rest:.3g}s" if minutes else f"{rest:.4g}s"
