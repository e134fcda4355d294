"""What the root LM is told about a large input (DSPy's ``REPLVariable``), without dumping the input.

DSPy's ``REPLVariable.from_value`` serialises the whole value as indented JSON to report its length
and a head-and-tail preview: for a corpus of 100,000 documents that is ~2 s and a few hundred MB per
run, and most of the worker's memory for a million. For lists and dicts of plain JSON values (what a
run's inputs are: they were decoded from JSON) ``repl_variable`` computes the same length
arithmetically (each string encoded by the C encoder, nothing joined), the head from the first chunks
of an incremental encoding, and the tail from the encoding of the last few items only. The result is
equal to DSPy's, field for field (``tests/test_dspy_contract.py``); any other value is DSPy's own.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

from dspy.primitives.repl_types import REPLVariable

__all__ = ["repl_variable"]

PREVIEW_CHARS = 1000  # REPLVariable.from_value's default, which RLM uses
INDENT = 2  # as REPLVariable.from_value dumps containers
_encode_str = json.encoder.encode_basestring_ascii  # json.dumps' default: ensure_ascii


class _NotPlainJSON(Exception):
    """A value the arithmetic does not cover (a subclass, a non-string key, NaN...): DSPy's path."""


def repl_variable(name: str, value: Any, field_info: Any = None) -> REPLVariable:
    """``REPLVariable.from_value(name, value, field_info)``, computed without dumping a list or dict."""
    if type(value) not in (list, dict) or not value:
        return REPLVariable.from_value(name, value, field_info=field_info)
    try:
        total = _length(value, 0)
    except (_NotPlainJSON, RecursionError):
        return REPLVariable.from_value(name, value, field_info=field_info)
    if total <= PREVIEW_CHARS:
        preview = json.dumps(value, indent=INDENT)
    else:
        head_chars = PREVIEW_CHARS // 2
        preview = _head(value, head_chars) + "..." + _tail(value, PREVIEW_CHARS - head_chars)
    described = REPLVariable.from_value(name, type(value)(), field_info=field_info)  # desc, constraints
    return described.model_copy(update={"total_length": total, "preview": preview})


def _length(value: Any, depth: int) -> int:
    """``len(json.dumps(value, indent=2))`` at nesting ``depth``, for plain JSON values."""
    kind = type(value)
    if kind is str:
        return len(_encode_str(value))
    if kind is list or kind is dict:
        if not value:
            return 2  # [] or {}
        inner = INDENT * (depth + 1)
        if kind is list and set(map(type, value)) == {str}:  # a corpus of texts: all in C
            body = inner * len(value) + sum(map(len, map(_encode_str, value)))
        elif kind is list:
            body = sum(inner + _length(item, depth + 1) for item in value)
        else:
            body = 0
            for key, item in value.items():
                if type(key) is not str:
                    raise _NotPlainJSON
                body += inner + len(_encode_str(key)) + 2 + _length(item, depth + 1)  # 'key: value'
        # "[\n" + items joined by ",\n" + "\n" + closing indent + "]"
        return 2 + body + 2 * (len(value) - 1) + 1 + INDENT * depth + 1
    if value is None or kind is bool:
        return 4 if value is None or value else 5
    if kind is int:
        return len(int.__repr__(value))
    if kind is float and math.isfinite(value):
        return len(float.__repr__(value))
    raise _NotPlainJSON


def _head(value: Any, chars: int) -> str:
    parts, size = [], 0
    for chunk in json.JSONEncoder(indent=INDENT).iterencode(value):  # stops once the head is long enough
        parts.append(chunk)
        size += len(chunk)
        if size >= chars:
            break
    return "".join(parts)[:chars]


def _tail(value: Any, chars: int) -> str:
    """The last ``chars`` of the whole dump: those of the dump of the last k items, once that is longer
    than ``chars`` plus its own opening (``[\\n`` or ``{\\n``), which the whole dump does not have there."""
    n, k = len(value), 1
    while True:
        k = min(k, n)
        if type(value) is list:
            suffix: Any = value[n - k:]
        else:
            suffix = dict(reversed(list(itertools.islice(reversed(value.items()), k))))
        text = json.dumps(suffix, indent=INDENT)
        if len(text) - 2 >= chars or k == n:
            return text[-chars:]
        k *= 2
