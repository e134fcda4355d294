"""rlmq settings: one typed record read from the environment and ``.env``.

Every field names its environment variable in its metadata. ``Settings.from_env()`` checks
all of them at once and raises a single :class:`SettingsError` whose message lists every
problem, so a worker started with a missing or wrong setting stops with one line instead of
failing mid-run. Fields marked ``per_run`` may be overridden by a run spec's ``options``, and
those marked ``capped`` are limits a run may lower but not raise: ``rlmq.run_options`` applies a
run's options under the operator's pins.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from rlmq.redis_url import parse_url

__all__ = [
    "CAPPED_OPTIONS",
    "RUN_OPTIONS",
    "LMClient",
    "LocalIsolation",
    "LogFormat",
    "SandboxBackend",
    "Settings",
    "SettingsError",
    "load_dotenv_once",
    "parse_field",
    "redis_url_from_env",
]

E = TypeVar("E", bound=Enum)


class SettingsError(ValueError):
    """A missing or invalid setting; the message is one line meant for a human."""


class SandboxBackend(str, Enum):
    """The backends of ``broker_bridge.factory.BACKENDS`` (a test keeps the two equal; rlmq does
    not import broker_bridge, which loads dspy)."""

    LOCAL = "local"
    DAYTONA = "daytona"


class LocalIsolation(str, Enum):
    """What isolates a local sandbox: bubblewrap namespaces, or (accepted explicitly) plain processes."""

    NAMESPACES = "namespaces"
    PROCESS = "process"  # no security boundary: the worker log and every run's record say so


class LogFormat(str, Enum):
    """How workers write their log lines."""

    TEXT = "text"  # Celery's own format
    JSON = "json"  # one JSON object per line with the run id, attempt, trace id and span id


class LMClient(str, Enum):
    """How calls reach the model."""

    AUTO = "auto"  # direct HTTP for an OpenAI-compatible api_base, LiteLLM for everything else
    LITELLM = "litellm"
    HTTP = "http"


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


def _bool(raw: str) -> bool:
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be on or off (true/false, 1/0)")


def _model(raw: str) -> str:
    value = raw.strip()
    provider, sep, name = value.partition("/")
    if not value or any(ch.isspace() for ch in value) or (sep and not (provider and name)):
        raise ValueError("must be a LiteLLM model string such as openai/gpt-4o-mini")
    return value


def _enum(kind: type[E]) -> Callable[[str], E]:
    """A member of ``kind`` by its value, case-insensitively."""

    def parse(raw: str) -> E:
        try:
            return kind(str(raw).strip().lower())
        except ValueError:
            raise ValueError(f"must be one of {', '.join(m.value for m in kind)}") from None

    return parse


_sandbox = _enum(SandboxBackend)


def _list_of(parse: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """A comma-separated list, each item checked by ``parse``."""

    def parse_list(raw: str) -> tuple[Any, ...]:
        items = tuple(parse(item) for item in raw.split(",") if item.strip())
        if not items:
            raise ValueError("must list at least one value")
        return items

    return parse_list


def _model_pattern(raw: str) -> str:
    value = raw.strip()
    if not value or any(ch.isspace() for ch in value):
        raise ValueError("must be model names or glob patterns such as openai/*")
    return value


def _maxima(raw: str) -> tuple[tuple[str, float], ...]:
    pairs = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, sep, number = item.partition("=")
        name = name.strip()
        if not sep or name not in CAPPED_OPTIONS:
            raise ValueError(f"must be name=number pairs with names from {', '.join(CAPPED_OPTIONS)}")
        pairs.append((name, _nonneg_float(number)))
    return tuple(pairs)


def _nonneg_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be zero or a positive number")
    return value


MAX_DEPTH_CEILING = 8  # a child's run id grows by ".N" per level; deeper trees are not a use case


def _depth(raw: str) -> int:
    value = _int(raw)
    if value > MAX_DEPTH_CEILING:
        raise ValueError(f"must be at most {MAX_DEPTH_CEILING}")
    return value


def _setting(env: str, parse: Callable[[str], Any], *, per_run: bool = True, capped: bool = False) -> dict[str, Any]:
    """A field's metadata: its variable, its parser, and whether a run may set it (and only lower it: ``capped``)."""
    return {"env": env, "parse": parse, "per_run": per_run, "capped": capped}


@dataclass(frozen=True)
class Settings:
    """Everything a worker or client needs; see the README's configuration table."""

    redis_url: str = field(
        default="", metadata=_setting("REDIS_URL", parse_url("redis", "rediss", "unix", "sentinel"), per_run=False))
    lm: str = field(default="", metadata=_setting("RLMQ_LM", _model))
    sub_lm: str = field(default="", metadata=_setting("RLMQ_SUB_LM", _model))  # empty: same as lm
    lm_api_base: str | None = field(default=None, metadata=_setting("RLMQ_LM_API_BASE", parse_url("http", "https")))
    sandbox: SandboxBackend = field(default=SandboxBackend.LOCAL, metadata=_setting("RLMQ_SANDBOX", _sandbox))
    # local sandboxes: bubblewrap namespaces, or (explicitly accepted) plain processes, no boundary
    local_isolation: LocalIsolation = field(
        default=LocalIsolation.NAMESPACES,
        metadata=_setting("RLMQ_LOCAL_ISOLATION", _enum(LocalIsolation), per_run=False))
    # the operator's pins: what a run may ask for (empty: only what this worker is configured with)
    allowed_api_bases: tuple[str, ...] = field(
        default=(), metadata=_setting("RLMQ_ALLOWED_API_BASES", _list_of(parse_url("http", "https")), per_run=False))
    allowed_models: tuple[str, ...] = field(
        default=(), metadata=_setting("RLMQ_ALLOWED_MODELS", _list_of(_model_pattern), per_run=False))
    allowed_sandboxes: tuple[SandboxBackend, ...] = field(
        default=(), metadata=_setting("RLMQ_ALLOWED_SANDBOXES", _list_of(_sandbox), per_run=False))
    run_maxima: tuple[tuple[str, float], ...] = field(
        default=(), metadata=_setting("RLMQ_RUN_MAXIMA", _maxima, per_run=False))
    # user tools ("module:function", globs) a run may import on the worker (empty: none)
    allowed_tools: tuple[str, ...] = field(
        default=(), metadata=_setting("RLMQ_ALLOWED_TOOLS", _list_of(_model_pattern), per_run=False))
    # fleet-wide limits per model (sub-calls and root calls): learned from the provider's replies;
    # these are optional ceilings on top (workers.adaptive_limit). The operator's, never a run's.
    rate_limit_rps: float | None = field(default=None, metadata=_setting("RLMQ_RATE_LIMIT_RPS", _float, per_run=False))
    rate_limit_burst: int = field(default=10, metadata=_setting("RLMQ_RATE_LIMIT_BURST", _int, per_run=False))
    tokens_per_minute: int | None = field(
        default=None, metadata=_setting("RLMQ_TOKENS_PER_MINUTE", _int, per_run=False))
    # a property of the fleet
    max_in_flight: int = field(default=128, metadata=_setting("RLMQ_MAX_IN_FLIGHT", _int, per_run=False))
    cache_ttl_seconds: int = field(default=7 * 24 * 3600, metadata=_setting("RLMQ_CACHE_TTL", _int, per_run=False))
    lm_timeout: float = field(default=120.0, metadata=_setting("RLMQ_LM_TIMEOUT", _float, capped=True))
    lm_retries: int = field(default=4, metadata=_setting("RLMQ_LM_RETRIES", _nonneg_int, capped=True))
    # auto: direct HTTP for openai/<name> + api_base (OpenAI-compatible), LiteLLM otherwise
    lm_client: LMClient = field(default=LMClient.AUTO, metadata=_setting("RLMQ_LM_CLIENT", _enum(LMClient)))
    # the RLM run
    max_iters: int = field(default=20, metadata=_setting("RLMQ_MAX_ITERS", _int, capped=True))
    max_llm_calls: int = field(default=500, metadata=_setting("RLMQ_MAX_LLM_CALLS", _int, capped=True))
    execution_timeout: float = field(default=300.0, metadata=_setting("RLMQ_EXECUTION_TIMEOUT", _float, capped=True))
    # a Daytona sandbox's whole boot (create, install, broker up), every API call in it included
    daytona_boot_timeout: float = field(default=180.0,
                                        metadata=_setting("RLMQ_DAYTONA_BOOT_TIMEOUT", _float, capped=True))
    # levels of runs in a tree: 1 = no rlm_query; n > 1 = sandbox code may start child runs n - 1 levels deep
    max_depth: int = field(default=1, metadata=_setting("RLMQ_MAX_DEPTH", _depth))
    # seconds the fleet has to claim a child run before its waiting parent runs it itself (workers.children)
    child_help_after: float = field(
        default=0.5, metadata=_setting("RLMQ_CHILD_HELP_AFTER", _nonneg_float, per_run=False))
    # a tree's limits: child runs started in all (sandbox code chooses how many: the operator caps it),
    # sandboxes live at once (none by default)
    max_children: int = field(default=64, metadata=_setting("RLMQ_MAX_CHILDREN", _int, capped=True))
    max_sandboxes: int | None = field(default=None, metadata=_setting("RLMQ_MAX_SANDBOXES", _int))
    # fan-out: prompts per sub-task message, and how many sub-tasks a big batch spreads over
    chunk_size: int = field(default=64, metadata=_setting("RLMQ_CHUNK_SIZE", _int, capped=True))
    fanout_width: int = field(default=8, metadata=_setting("RLMQ_FANOUT_WIDTH", _int, capped=True))
    # > the sub-task's own hard limit (SUBTASK_DEADLINE + 60 s), so a live sub-task never times out here first
    gather_timeout: float = field(default=1200.0, metadata=_setting("RLMQ_GATHER_TIMEOUT", _float, capped=True))
    # budgets per run (none by default): dollars (LiteLLM's prices), tokens, wall-clock seconds
    max_cost: float | None = field(default=None, metadata=_setting("RLMQ_MAX_COST", _float))
    max_tokens: int | None = field(default=None, metadata=_setting("RLMQ_MAX_TOKENS", _int))
    time_limit: float | None = field(default=None, metadata=_setting("RLMQ_TIME_LIMIT", _float))
    # worker-level, not per run
    run_time_limit: float = field(default=6 * 3600.0, metadata=_setting("RLMQ_RUN_TIME_LIMIT", _float, per_run=False))
    # a run's claim and its sandboxes' leases: a dead owner is noticed this long after its last renewal
    lease_ttl: float = field(default=30.0, metadata=_setting("RLMQ_LEASE_TTL", _float, per_run=False))
    # how often every rlm worker sweeps for lost runs and expired sandbox leases
    maintenance_interval: float = field(
        default=5.0, metadata=_setting("RLMQ_MAINTENANCE_INTERVAL", _float, per_run=False))
    # how many times a run is started in all (the first start included) before it FAILS
    run_attempts: int = field(default=3, metadata=_setting("RLMQ_RUN_ATTEMPTS", _int, per_run=False))
    # a worker whose heartbeat is older than this is dead: its sub-tasks are sent again
    worker_heartbeat_ttl: float = field(
        default=10.0, metadata=_setting("RLMQ_WORKER_HEARTBEAT_TTL", _float, per_run=False))
    result_expires: int = field(default=7 * 24 * 3600, metadata=_setting("RLMQ_RESULT_EXPIRES", _int, per_run=False))
    # task events for llm_batch sub-tasks (Flower's per-worker counts; ~costs measured in docs/ARCHITECTURE.md)
    subtask_events: bool = field(default=True, metadata=_setting("RLMQ_SUBTASK_EVENTS", _bool, per_run=False))
    # workers' log lines: Celery's text, or JSON objects that join the run's trace (workers.log_format)
    log_format: LogFormat = field(default=LogFormat.TEXT,
                                  metadata=_setting("RLMQ_LOG_FORMAT", _enum(LogFormat), per_run=False))

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
                problems.append(f"{f.metadata['env']}={raw!r} {reason(exc)}")
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

    def _cross_check(self, environ: Mapping[str, str]) -> list[str]:
        problems = []
        if self.sandbox is SandboxBackend.DAYTONA and not environ.get("DAYTONA_API_KEY"):
            problems.append("RLMQ_SANDBOX=daytona needs DAYTONA_API_KEY")
        for name, limit in self.run_maxima:
            if getattr(self, name) > limit:  # every run that asks for nothing would be over the maximum
                problems.append(f"RLMQ_RUN_MAXIMA: {name}={limit:g} is below the configured {name} "
                                f"({getattr(self, name):g})")
        return problems


# The one list of run options: what a run spec's ``options`` (the client, the CLI's flags) may set;
# and those of them that are limits (a run may lower them, not raise them above RLMQ_RUN_MAXIMA).
RUN_OPTIONS = tuple(f.name for f in dataclasses.fields(Settings) if f.metadata["per_run"])
CAPPED_OPTIONS = tuple(f.name for f in dataclasses.fields(Settings) if f.metadata["capped"])


def parse_field(name: str, raw: Any) -> Any:
    """A setting's value from text (or an enum member), checked by the field's own parser."""
    f = _FIELDS[name]
    text = raw.value if isinstance(raw, Enum) else raw if isinstance(raw, str) else str(raw)
    return f.metadata["parse"](text)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

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


def reason(exc: Exception) -> str:
    """A parser's complaint as the end of a one-line message."""
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
