"""User tools for fleet tests: importable on the workers as ``tests.support.sample_tools:NAME``."""

from __future__ import annotations

import asyncio


def count_words(text: str) -> int:
    """Number of whitespace-separated words in text."""
    return len(text.split())


def find_names(text: str, names: list[str] | None = None, limit: int = 2) -> list[str]:
    """The given names (default: the Morrel family's) that occur in text, at most `limit`."""
    wanted = names if names is not None else ["Morrel", "Julie", "Maximilian"]
    return [n for n in wanted if n in text][:limit]


async def shout(text: str, suffix: str = "!") -> str:
    """An async tool: text upper-cased, with a suffix."""
    await asyncio.sleep(0.01)
    return text.upper() + suffix
