"""One LM request, with its failure classified: direct HTTP to an OpenAI-compatible endpoint, or LiteLLM.

``call_lm`` makes exactly one HTTP attempt (LiteLLM's and the OpenAI SDK's own retries are off:
retries and rate limiting belong to ``workers.lm_gateway``, caching to ``workers.batch_answer``, and
both must see every attempt). Which client serves a call is ``RLMQ_LM_CLIENT`` (``auto``: direct
HTTP for ``openai/...`` models on a configured api base, LiteLLM otherwise). Failures become
:class:`LMCallError` with a :class:`FailureKind` that says what to do next: wait ``retry_after`` and
retry (rate limited), retry with backoff (transient), or give up (permanent). An empty completion
is an error, so it is never cached. A reply's price comes from ``workers.pricing`` on both paths:
the direct one never imports LiteLLM.
"""

from __future__ import annotations

import http.client
import json
import os
from dataclasses import asdict, dataclass
from enum import Enum
from functools import lru_cache
from typing import Any

from broker_bridge.keepalive import KeepAlivePool
from rlmq.settings import LMClient
from workers.pricing import price

# LiteLLM otherwise fetches its price map from the internet at import (seconds, or a hang
# offline); the copy it ships is enough to price known models.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__all__ = [
    "FailureKind", "LMCallError", "LMClient", "LMReply",
    "call_lm", "litellm_module", "preload", "prompt_messages",
]


@lru_cache(maxsize=1)
def litellm_module() -> Any:
    """LiteLLM, imported on first need: the import costs ~6 s of CPU, which clients and run
    workers should not pay; ``llm`` workers preload it at start."""
    import litellm

    litellm.suppress_debug_info = True
    return litellm

Messages = list[dict[str, Any]]


class FailureKind(str, Enum):
    RATE_LIMITED = "rate_limited"  # 429: wait (Retry-After) and retry, and pause the fleet
    TRANSIENT = "transient"  # 5xx, timeouts, connection errors, malformed or empty replies
    PERMANENT = "permanent"  # auth, bad request, unknown model, context too long


class LMCallError(Exception):
    def __init__(self, kind: FailureKind, message: str, *, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.status = status


@dataclass(frozen=True)
class LMReply:
    """A successful completion: the text plus what it cost."""

    text: str
    usage: dict[str, int]
    cost: float | None  # USD, where LiteLLM's price table knows the model (workers.pricing)
    model: str

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> LMReply:
        return cls(text=str(raw["text"]), usage={k: int(v) for k, v in (raw.get("usage") or {}).items()},
                   cost=raw.get("cost"), model=str(raw.get("model", "")))

    @staticmethod
    def is_record(raw: dict[str, Any]) -> bool:
        """Whether ``raw`` (read from Redis) has the shape ``to_json_dict`` writes."""
        usage, cost = raw.get("usage") or {}, raw.get("cost")
        return (isinstance(raw.get("text"), str) and bool(raw["text"].strip()) and isinstance(usage, dict)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in usage.values())
                and (cost is None or (isinstance(cost, (int, float)) and not isinstance(cost, bool)))
                and isinstance(raw.get("model", ""), str))


def prompt_messages(prompt: str | Messages) -> Messages:
    """A prompt string as chat messages; messages pass through."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return prompt


def call_lm(model: str, messages: Messages, *, api_base: str | None = None, timeout: float = 120.0,
            params: dict[str, Any] | None = None, client: LMClient | str = LMClient.AUTO,
            headers_out: dict[str, str] | None = None) -> LMReply:
    """Make one completion request; raise :class:`LMCallError` on any failure.

    ``headers_out``, if given, receives the reply's HTTP headers (success or error): the
    adaptive limiter reads the provider's rate limit from them.

    ``openai/<name>`` with an ``api_base`` (vLLM, Ollama, LM Studio, proxies, the test stub) is
    plain JSON over HTTP, so under ``auto`` it skips LiteLLM, whose per-call CPU (~11 ms,
    measured) would cap a 2-core worker near 150 calls/s.
    """
    client = LMClient(client)
    direct = client is LMClient.HTTP or (client is LMClient.AUTO and bool(api_base) and model.startswith("openai/"))
    if direct:
        if not api_base:
            raise LMCallError(FailureKind.PERMANENT, "the direct HTTP client needs an api_base")
        return _call_http(model, messages, api_base=api_base, timeout=timeout, params=params or {},
                          headers_out=headers_out)
    return _call_litellm(model, messages, api_base=api_base, timeout=timeout, params=params or {},
                         headers_out=headers_out)


def _call_litellm(model: str, messages: Messages, *, api_base: str | None, timeout: float,
                  params: dict[str, Any], headers_out: dict[str, str] | None = None) -> LMReply:
    kwargs: dict[str, Any] = dict(params)
    if api_base:
        kwargs["api_base"] = api_base
        # OpenAI-compatible local endpoints often need no key, but the SDK insists on one.
        if model.startswith("openai/") and not os.environ.get("OPENAI_API_KEY"):
            kwargs.setdefault("api_key", "not-needed")
    litellm = litellm_module()
    try:
        response = litellm.completion(model=model, messages=messages, timeout=timeout,
                                      num_retries=0, max_retries=0, **kwargs)
    except Exception as exc:  # LiteLLM raises many types; classify them all
        if headers_out is not None:
            headers_out.update(_error_headers(exc))
        raise classify(exc) from exc
    if headers_out is not None:  # LiteLLM keeps the provider's headers as llm_provider-<name>
        hidden = getattr(response, "_hidden_params", None) or {}
        headers_out.update(hidden.get("additional_headers") or getattr(response, "_response_headers", None) or {})
    try:
        text = response.choices[0].message.content
    except (AttributeError, IndexError, TypeError) as exc:
        raise LMCallError(FailureKind.TRANSIENT, f"malformed completion: {exc}") from exc
    usage_obj = getattr(response, "usage", None)
    usage = {k: int(getattr(usage_obj, k, 0) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return _reply(model, text, usage)


def preload() -> None:
    """Import LiteLLM before the first call (worker start): the import costs seconds of CPU."""
    litellm_module()


_http = KeepAlivePool()  # kept-alive connections per thread and api base (broker_bridge.keepalive)


def _post_json(api_base: str, path: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, Any, bytes]:
    """POST to ``api_base + path``; a failure to get an answer is a TRANSIENT :class:`LMCallError`."""
    try:
        return _http.request(api_base.rstrip("/"), "POST", path, body=body, headers=headers, timeout=timeout)
    except TimeoutError as exc:
        raise LMCallError(FailureKind.TRANSIENT, f"timeout after {timeout:g}s: {type(exc).__name__}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise LMCallError(FailureKind.TRANSIENT, _short(exc)) from exc


def _call_http(model: str, messages: Messages, *, api_base: str, timeout: float, params: dict[str, Any],
               headers_out: dict[str, str] | None = None) -> LMReply:
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    body = json.dumps({**params, "model": model.split("/", 1)[1], "messages": messages}).encode()
    status, response_headers, raw = _post_json(api_base, "/chat/completions", body, headers, timeout)
    if headers_out is not None:
        headers_out.update(response_headers.items())
    text_head = raw[:200].decode("utf-8", "replace")
    if status == 429:
        raise LMCallError(FailureKind.RATE_LIMITED, f"HTTP 429: {text_head}",
                          retry_after=_retry_after_headers(response_headers), status=429)
    if status >= 500 or status == 408:
        raise LMCallError(FailureKind.TRANSIENT, f"HTTP {status}: {text_head}", status=status)
    if status >= 400:
        raise LMCallError(FailureKind.PERMANENT, f"HTTP {status}: {text_head}", status=status)
    try:
        data = json.loads(raw)
        text = data["choices"][0]["message"]["content"]
        usage_raw = data.get("usage") or {}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise LMCallError(FailureKind.TRANSIENT, f"malformed completion: {_short(exc, 120)}") from exc
    usage = {k: int(usage_raw.get(k) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return _reply(model, text, usage)


def _reply(model: str, text: Any, usage: dict[str, int]) -> LMReply:
    if not isinstance(text, str) or not text.strip():
        raise LMCallError(FailureKind.TRANSIENT, "empty completion")
    return LMReply(text=text, usage=usage, model=model,
                   cost=price(model, usage["prompt_tokens"], usage["completion_tokens"]))


_PERMANENT_STATUS = {400, 401, 403, 404, 413, 422}


def classify(exc: BaseException) -> LMCallError:
    """Map a LiteLLM/OpenAI/httpx exception to an :class:`LMCallError`."""
    litellm = litellm_module()
    status = getattr(exc, "status_code", None)
    message = _short(exc)
    if isinstance(exc, litellm.RateLimitError) or status == 429:
        return LMCallError(FailureKind.RATE_LIMITED, message, retry_after=_retry_after(exc), status=429)
    if isinstance(exc, (litellm.Timeout, litellm.APIConnectionError, litellm.InternalServerError,
                        litellm.ServiceUnavailableError, litellm.BadGatewayError)):
        return LMCallError(FailureKind.TRANSIENT, message, status=status)
    if isinstance(exc, (litellm.AuthenticationError, litellm.BadRequestError, litellm.NotFoundError,
                        litellm.PermissionDeniedError, litellm.ContextWindowExceededError)):
        return LMCallError(FailureKind.PERMANENT, message, status=status)
    if isinstance(status, int) and status in _PERMANENT_STATUS:
        return LMCallError(FailureKind.PERMANENT, message, status=status)
    # Unknown: a bad reply body, a dropped connection, a 5xx we have no class for.
    return LMCallError(FailureKind.TRANSIENT, message, status=status if isinstance(status, int) else None)


def _error_headers(exc: BaseException) -> Any:
    return getattr(getattr(exc, "response", None), "headers", None) or getattr(exc, "litellm_response_headers", None) or {}


def _retry_after(exc: BaseException) -> float | None:
    headers = _error_headers(exc)
    return _retry_after_headers(headers) if headers else None


def _retry_after_headers(headers: Any) -> float | None:
    raw = headers.get("retry-after-ms")
    if raw is not None:
        try:
            return max(0.0, float(raw) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        import time
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
