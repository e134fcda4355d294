"""rlmq settings: one typed record read from the environment and ``.env``.

Every field names its environment variable in its metadata. ``Settings.from_env()`` checks
all of them at once and raises a single :class:`SettingsError` whose message lists every
problem, so a worker started with a missing or wrong setting stops with one line instead of
failing mid-run. Fields marked ``per_run`` may be overridden by a run spec's ``options``
(``Settings.with_options``), validated the same way.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlparse

__all__ = ["RUN_OPTIONS", "redis_url_argument", "SandboxBackend", "Settings", "SettingsError", "redis_url_from_env", "load_dotenv_once"]


class SettingsError(ValueError):
    """A missing or invalid setting; the message is one line meant for a human."""


class SandboxBackend(str, Enum):
    """The backends of ``broker_bridge.factory.BACKENDS`` (a test keeps the two equal; rlmq does
    not import broker_bridge, which loads dspy)."""

    LOCAL = "local"
    DAYTONA = "daytona"


def _str(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number")
    return value


def _int(raw: str) -> int:
    value = int(str(raw).strip())
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _nonneg_int(raw: str) -> int:
    value = int(str(raw).strip())
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        parsed = urlparse(value)
        try:
            parsed.port  # noqa: B018  (raises ValueError for a port that is not a number)
        except ValueError:
            raise ValueError("has a port that is not a number") from None
        if parsed.scheme not in schemes or not (parsed.hostname or parsed.path):
            raise ValueError(f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}")
        return value

    return parse


def redis_url_argument(raw: str) -> str:
    """``--redis-url``'s value, checked like ``REDIS_URL``."""
    return _url(("redis", "rediss", "unix"))(raw)


def _model(raw: str) -> str:
    value = raw.strip()
    provider, sep, name = value.partition("/")
    if not value or any(ch.isspace() for ch in value) or (sep and not (provider and name)):
        raise ValueError("must be a LiteLLM model string such as openai/gpt-4o-mini")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _sandbox(raw: str) -> SandboxBackend:
    try:
        return SandboxBackend(raw.strip().lower())
    except ValueError:
        raise ValueError(f"must be one of {', '.join(b.value for b in SandboxBackend)}") from None


def _opt(env: str, parse: Callable[[str], Any], default: Any, *, per_run: bool = True) -> Any:
    return field(default=default, metadata={"env": env, "parse": parse, "per_run": per_run})


@dataclass(frozen=True)
class Settings:
    """Everything a worker or client needs; see the README's configuration table."""

    redis_url: str = _opt("REDIS_URL", _url(("redis", "rediss", "unix")), "", per_run=False)
    lm: str = _opt("RLMQ_LM", _model, "")
    sub_lm: str = _opt("RLMQ_SUB_LM", _model, "")  # empty: same as lm
    lm_api_base: str | None = _opt("RLMQ_LM_API_BASE", _url(("http", "https")), None)
    sandbox: SandboxBackend = _opt("RLMQ_SANDBOX", _sandbox, SandboxBackend.LOCAL)
    # fleet-wide limits per model (sub-calls and root calls): learned from the provider's replies;
    # these are optional ceilings on top (workers.adaptive_limit)
    rate_limit_rps: float | None = _opt("RLMQ_RATE_LIMIT_RPS", _float, None)
    rate_limit_burst: int = _opt("RLMQ_RATE_LIMIT_BURST", _int, 10)
    tokens_per_minute: int | None = _opt("RLMQ_TOKENS_PER_MINUTE", _int, None)
    max_in_flight: int = _opt("RLMQ_MAX_IN_FLIGHT", _int, 128, per_run=False)  # a property of the fleet
    cache_ttl_seconds: int = _opt("RLMQ_CACHE_TTL", _int, 7 * 24 * 3600)
    lm_timeout: float = _opt("RLMQ_LM_TIMEOUT", _float, 120.0)
    lm_retries: int = _opt("RLMQ_LM_RETRIES", _nonneg_int, 4)
    # auto: direct HTTP for openai/<name> + api_base (OpenAI-compatible), LiteLLM otherwise
    lm_client: str = _opt("RLMQ_LM_CLIENT", _choice("auto", "litellm", "http"), "auto")
    # the RLM run
    max_iters: int = _opt("RLMQ_MAX_ITERS", _int, 20)
    max_llm_calls: int = _opt("RLMQ_MAX_LLM_CALLS", _int, 500)
    execution_timeout: float = _opt("RLMQ_EXECUTION_TIMEOUT", _float, 300.0)
    # fan-out: prompts per sub-task message, and how many sub-tasks a big batch spreads over
    chunk_size: int = _opt("RLMQ_CHUNK_SIZE", _int, 8)
    fanout_width: int = _opt("RLMQ_FANOUT_WIDTH", _int, 64)
    gather_timeout: float = _opt("RLMQ_GATHER_TIMEOUT", _float, 900.0)
    # worker-level, not per run
    run_time_limit: float = _opt("RLMQ_RUN_TIME_LIMIT", _float, 6 * 3600.0, per_run=False)
    lease_ttl: float = _opt("RLMQ_LEASE_TTL", _float, 90.0, per_run=False)
    result_expires: int = _opt("RLMQ_RESULT_EXPIRES", _int, 7 * 24 * 3600, per_run=False)

    @property
    def effective_sub_lm(self) -> str:
        return self.sub_lm or self.lm

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, require_lm: bool = True) -> Settings:
        """Read and validate every setting; ``environ=None`` means ``os.environ`` plus ``.env``."""
        if environ is None:
            load_dotenv_once()
            environ = os.environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw.strip() == "":
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except (ValueError, TypeError) as exc:
                problems.append(f"{f.metadata['env']}={raw!r} {_reason(exc)}")
        if "redis_url" not in values and not any(p.startswith("REDIS_URL=") for p in problems):
            problems.append("REDIS_URL is not set (run `rlmq up`, or set REDIS_URL=redis://host:6379/0)")
        if "lm" not in values and not any(p.startswith("RLMQ_LM=") for p in problems):
            inferred = default_model_for_keys(environ)
            if inferred:
                values["lm"] = inferred
            elif require_lm:
                problems.append("RLMQ_LM is not set and no provider key (OPENAI_API_KEY, ANTHROPIC_API_KEY, "
                                "OPENROUTER_API_KEY) says which model to use; e.g. RLMQ_LM=openai/gpt-4o-mini")
        if "sandbox" not in values and environ.get("DAYTONA_API_KEY") and not environ.get("RLMQ_SANDBOX"):
            values["sandbox"] = SandboxBackend.DAYTONA  # a Daytona key means "use Daytona" unless told otherwise
        settings = cls(**values)
        problems.extend(settings._cross_check(environ))
        if problems:
            raise SettingsError("rlmq settings: " + "; ".join(problems))
        return settings

    def with_options(self, options: Mapping[str, Any] | None) -> Settings:
        """This settings record with a run's per-run ``options`` (field names) applied and validated."""
        if not options:
            return self
        fields = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        problems: list[str] = []
        for name, raw in options.items():
            f = fields.get(name)
            if f is None or not f.metadata["per_run"]:
                allowed = sorted(n for n, g in fields.items() if g.metadata["per_run"])
                problems.append(f"unknown run option {name!r} (allowed: {', '.join(allowed)})")
                continue
            if raw is None:
                values[name] = f.default
                continue
            try:
                text = raw.value if isinstance(raw, Enum) else raw if isinstance(raw, str) else str(raw)
                values[name] = f.metadata["parse"](text)
            except (ValueError, TypeError) as exc:
                problems.append(f"run option {name}={raw!r} {_reason(exc)}")
        if problems:
            raise SettingsError("rlmq run options: " + "; ".join(problems))
        return dataclasses.replace(self, **values)

    def _cross_check(self, environ: Mapping[str, str]) -> list[str]:
        problems = []
        if self.sandbox is SandboxBackend.DAYTONA and not environ.get("DAYTONA_API_KEY"):
            problems.append("RLMQ_SANDBOX=daytona needs DAYTONA_API_KEY")
        return problems


# The one list of run options: what a run spec's ``options`` (the client, the CLI's flags) may set.
RUN_OPTIONS = tuple(f.name for f in dataclasses.fields(Settings) if f.metadata["per_run"])

# With only a provider key configured, this model of that provider is the root (and sub) model.
DEFAULT_MODELS = (
    ("OPENAI_API_KEY", "openai/gpt-4o-mini"),
    ("ANTHROPIC_API_KEY", "anthropic/claude-3-5-haiku-latest"),
    ("OPENROUTER_API_KEY", "openrouter/openai/gpt-4o-mini"),
)


def default_model_for_keys(environ: Mapping[str, str]) -> str | None:
    for key, model in DEFAULT_MODELS:
        if environ.get(key, "").strip():
            return model
    return None


def _reason(exc: Exception) -> str:
    text = str(exc)
    if text.startswith(("invalid literal", "could not convert")):
        return "is not a number"
    return text


_dotenv_loaded = False


def load_dotenv_once() -> None:
    """Load ``.env`` from the working directory (or a parent) into ``os.environ``, never overriding.

    Into ``os.environ`` on purpose: provider API keys in ``.env`` must reach LiteLLM too.
    """
    global _dotenv_loaded
    if _dotenv_loaded:
        return
    _dotenv_loaded = True
    from dotenv import find_dotenv, load_dotenv

    path = find_dotenv(usecwd=True)
    if path:
        load_dotenv(path, override=False)


def redis_url_from_env() -> str | None:
    """``REDIS_URL`` (after ``.env``), or None: the Celery app needs it before full validation."""
    load_dotenv_once()
    raw = os.environ.get("REDIS_URL", "").strip()
    return raw or None
