"""A run's options under the operator's pins: the submitter asks, the operator decides.

A run spec's ``options`` override the workers' :class:`~rlmq.settings.Settings` fields marked
``per_run`` (:data:`~rlmq.settings.RUN_OPTIONS`), validated by the fields' own parsers. An option
that changes where keys go or what runs (``lm_api_base``, ``lm``/``sub_lm``, ``sandbox``) must be on
the workers' allow-list (``RLMQ_ALLOWED_*``, by default only what the workers themselves are
configured with); a limit (:data:`~rlmq.settings.CAPPED_OPTIONS`) may not exceed the workers'
maximum (``RLMQ_RUN_MAXIMA``, by default the configured value); a user tool must match
``RLMQ_ALLOWED_TOOLS`` (none by default). Fleet-wide settings (rate limits, cache TTL, the
allow-lists themselves) are not run options at all.

The workers check at a run's start (before any sandbox or LM call) and in every sub-task; the
client checks at submit when it is configured like a worker.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from rlmq.settings import CAPPED_OPTIONS, RUN_OPTIONS, Settings, SettingsError, parse_field, reason

__all__ = [
    "CAPPED_OPTIONS",
    "RUN_OPTIONS",
    "OptionRefused",
    "api_base_allowed",
    "check_tools",
    "maximum",
    "model_allowed",
    "with_options",
]


class OptionRefused(SettingsError):
    """A run option the workers' pins (allow-lists, maxima) do not allow; one line."""


def with_options(settings: Settings, options: Mapping[str, Any] | None, *, pinned: bool = True,
                 whose: str = "the workers' settings") -> Settings:
    """``settings`` with a run's ``options`` (field names from :data:`RUN_OPTIONS`) applied and validated.

    ``pinned``: also refuse (:class:`OptionRefused`) what the pins of ``settings`` do not allow;
    ``whose`` names those settings in the message.
    """
    if not options:
        return settings
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, raw in options.items():
        if name not in RUN_OPTIONS:
            problems.append(f"unknown run option {name!r} (allowed: {', '.join(sorted(RUN_OPTIONS))})")
            continue
        if raw is None:
            continue  # not asked: the worker's value stands
        try:
            values[name] = parse_field(name, raw)
        except (ValueError, TypeError) as exc:
            problems.append(f"run option {name}={raw!r} {reason(exc)}")
    if problems:
        raise SettingsError("rlmq run options: " + "; ".join(problems))
    refused = [r for r in (_refusal(settings, n, v) for n, v in values.items()) if r] if pinned else []
    if refused:
        raise OptionRefused(f"rlmq run options refused by {whose}: " + "; ".join(refused))
    return dataclasses.replace(settings, **values)

def api_base_allowed(settings: Settings, api_base: str | None) -> bool:
    """Whether ``api_base`` (None: the provider's default endpoint) is an endpoint the operator
    configured: RLMQ_ALLOWED_API_BASES, else only RLMQ_LM_API_BASE."""
    return _base(api_base) in {_base(settings.lm_api_base), *(_base(u) for u in settings.allowed_api_bases)}


def model_allowed(settings: Settings, model: str) -> bool:
    """RLMQ_ALLOWED_MODELS (glob patterns), else only the configured root and sub models."""
    configured = tuple(m for m in (settings.lm, settings.effective_sub_lm) if m)
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in (*configured, *settings.allowed_models))


def check_tools(settings: Settings, paths: Sequence[str], *, whose: str = "the workers' settings") -> None:
    """:class:`OptionRefused` unless every user tool matches RLMQ_ALLOWED_TOOLS: a tool is host code
    that sandbox code may call (``os:system`` would hand it the worker), so none by default."""
    refused = [p for p in paths if not any(fnmatch.fnmatchcase(p, pattern) for pattern in settings.allowed_tools)]
    if refused:
        listed = ", ".join(settings.allowed_tools) or "none"
        raise OptionRefused(f"rlmq run tools refused by {whose}: {', '.join(refused)} "
                            f"(RLMQ_ALLOWED_TOOLS: {listed})")


def maximum(settings: Settings, name: str) -> float:
    """The highest value a run may ask for a capped option: RLMQ_RUN_MAXIMA, else the configured one."""
    configured: float = getattr(settings, name)
    return dict(settings.run_maxima).get(name, configured)


def _refusal(settings: Settings, name: str, value: Any) -> str | None:
    """Why a run may not set option ``name`` to ``value`` on this worker, or None."""
    if name in ("lm", "sub_lm") and value and not model_allowed(settings, value):
        patterns = ", ".join(settings.allowed_models) or "the configured models only"
        return f"{name}={value!r} is not allowed (RLMQ_ALLOWED_MODELS: {patterns})"
    if name == "lm_api_base" and not api_base_allowed(settings, value):
        return (f"lm_api_base={value!r} is not an endpoint the operator configured "
                f"(RLMQ_ALLOWED_API_BASES: {', '.join(settings.allowed_api_bases) or 'RLMQ_LM_API_BASE only'})")
    if name == "sandbox":
        allowed = (settings.sandbox, *(b for b in settings.allowed_sandboxes if b is not settings.sandbox))
        if value not in allowed:
            return (f"sandbox={value.value!r} is not allowed "
                    f"(RLMQ_ALLOWED_SANDBOXES: {', '.join(b.value for b in allowed)})")
    if name in CAPPED_OPTIONS and value > maximum(settings, name):
        return f"{name}={value:g} is above this fleet's maximum {maximum(settings, name):g} (RLMQ_RUN_MAXIMA)"
    return None


def _base(url: str | None) -> str | None:
    return url.strip().rstrip("/") if url else None
