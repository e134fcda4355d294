"""What the Redis-backed ``dspy.cache`` keeps in Redis: JSON only, never a pickle.

DSPy 3.4.1 caches one of two things per LM call (``dspy/clients/execution.py`` ``_store``):

* the native (lm15) engine: ``CallResult.dump()``, a plain dict tagged
  ``{"_dspy_format": "dspy-lm15-result-v1", ...}``; stored as ``J`` + its JSON;
* the LiteLLM engine: LiteLLM's ``ModelResponse`` (``ResponsesAPIResponse`` for
  ``model_type="responses"``); stored as ``M``/``R`` + ``model_dump(mode="json")`` and rebuilt
  with the class's constructor, which is what LiteLLM itself does with a provider's JSON.

Anything else is not put into Redis (the process's memory tier still has it). Reading, an
entry is a hit only if it decodes into one of those shapes *and* DSPy could use it (a native
record must load with ``CallResult.load``); everything else — old pickled ``P`` entries, bad
JSON, a planted record of the wrong shape — is a miss: :class:`RejectedEntry`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

__all__ = ["RejectedEntry", "decode", "encode"]

_NATIVE = b"J"
# LiteLLM's response classes, by tag: module and name are fixed here, never read from Redis.
_PYDANTIC = {b"M": ("litellm", "ModelResponse"), b"R": ("litellm", "ResponsesAPIResponse")}


class RejectedEntry(ValueError):
    """A cache entry (or value) this codec will not turn into an object; the message says why."""


def _native_format() -> str:
    from dspy.clients.call_result import CACHE_FORMAT

    return CACHE_FORMAT


def _pydantic_class(tag: bytes) -> type[Any]:  # litellm's response classes, which ship no types
    module, name = _PYDANTIC[tag]
    return getattr(__import__(module), name)


def encode(value: Any) -> bytes:
    """The bytes to store for ``value``; :class:`RejectedEntry` if it is not a shape DSPy caches."""
    try:
        if isinstance(value, dict) and value.get("_dspy_format") == _native_format():
            return _NATIVE + json.dumps(value, allow_nan=False).encode()
        kind = type(value)
        for tag, (module, name) in _PYDANTIC.items():
            if kind.__name__ == name and kind.__module__.split(".")[0] == module and isinstance(value, _pydantic_class(tag)):
                return tag + json.dumps(value.model_dump(mode="json"), allow_nan=False).encode()
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise RejectedEntry(f"not JSON-serialisable: {exc}") from None
    raise RejectedEntry(f"{type(value).__module__}.{type(value).__qualname__} is not a DSPy LM cache record")


def decode(raw: bytes) -> Any:
    """The cached object for ``raw``; :class:`RejectedEntry` for anything but a well-formed record."""
    tag, body = raw[:1], raw[1:]
    if tag != _NATIVE and tag not in _PYDANTIC:
        raise RejectedEntry(f"unknown tag {tag!r} (pickled entries are never loaded)")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RejectedEntry(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RejectedEntry(f"a JSON {type(data).__name__}, not an object")
    try:
        if tag == _NATIVE:
            if data.get("_dspy_format") != _native_format():
                raise RejectedEntry("not a DSPy lm15 record")
            from dspy.clients.call_result import CallResult

            CallResult.load(data)  # what a hit will do: a record it cannot load is no hit
            return data
        items = data.get("choices" if tag == b"M" else "output")
        if not (isinstance(items, list) and items and all(isinstance(item, dict) for item in items)):
            raise RejectedEntry("a response without a list of choices / output items")
        return _pydantic_class(tag)(**data)
    except RejectedEntry:
        raise
    except Exception as exc:  # pydantic / DSPy validation errors of many types
        raise RejectedEntry(f"wrong shape: {type(exc).__name__}: {str(exc)[:120]}") from None


_logged: set[str] = set()


def log_once(logger: logging.Logger, kind: str, message: str, *args: Any) -> None:
    """One warning per kind of rejected entry per process: a poisoned cache must not flood the log."""
    if kind not in _logged:
        _logged.add(kind)
        logger.warning(message + " (logged once per process)", *args)
