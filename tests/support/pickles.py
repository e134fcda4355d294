"""Hostile pickles, for tests that show rlmq never unpickles what Redis returns."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

__all__ = ["ExecOnUnpickle", "dotted_name_gadget", "hostile_pickles"]


def _short_unicode(text: str) -> bytes:
    data = text.encode()
    assert len(data) < 256
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def dotted_name_gadget(marker: Path, module: str = "litellm.types.llms.openai") -> bytes:
    """Protocol 4: STACK_GLOBAL(module, "builtins.eval") resolves a dotted name inside a module
    that DSPy's restricted unpickler trusts (``litellm.types.*``), then calls it: creates ``marker``."""
    code = f"open({str(marker)!r}, 'w').close()"
    return (b"\x80\x04" + _short_unicode(module) + _short_unicode("builtins.eval") + b"\x93"
            + _short_unicode(code) + b"\x85R.")


class ExecOnUnpickle:
    """An object whose unpickling creates ``marker`` (the classic ``__reduce__`` gadget)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def hostile_pickles(marker: Path) -> list[bytes]:
    """Pickles that create ``marker`` when loaded: the dotted-name gadget and a plain ``__reduce__``."""
    return [dotted_name_gadget(marker), pickle.dumps(ExecOnUnpickle(marker), protocol=4)]
