"""Dollar prices of LM calls, from LiteLLM's price table, without importing LiteLLM; and the one
estimate of a prompt's tokens.

LiteLLM ships its price map as JSON (``model_prices_and_context_window_backup.json``, the table
behind ``litellm.model_cost`` / ``litellm.cost_per_token``). Every price in rlmq comes from here
(``workers.llm_call`` prices each reply, ``workers.usage`` and ``workers.budget`` the run's calls),
reading that file directly: importing LiteLLM costs ~6 s of CPU, which a run worker whose calls go
over direct HTTP never pays. A model the table does not know has no price (``None``): rlmq then
reports tokens but no dollars, and a ``max_cost`` budget cannot be enforced for it (the run says so).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

__all__ = ["estimate_tokens", "model_price", "price"]


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.origin:
        return {}
    path = os.path.join(os.path.dirname(spec.origin), "model_prices_and_context_window_backup.json")
    try:
        with open(path, encoding="utf-8") as handle:
            table = json.load(handle)
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


@lru_cache(maxsize=256)
def model_price(model: str) -> tuple[float, float] | None:
    """(USD per input token, USD per output token) for a LiteLLM model string, or None.

    Tries the string as given, then without its provider prefix (``openai/gpt-4o-mini`` is
    listed as ``gpt-4o-mini``), as ``litellm.cost_per_token`` does for these providers.
    """
    table = _table()
    candidates = [model]
    if "/" in model:
        candidates.append(model.split("/", 1)[1])
        candidates.append(model.rsplit("/", 1)[1])
    for name in candidates:
        entry = table.get(name)
        if isinstance(entry, dict) and "input_cost_per_token" in entry:
            try:
                return float(entry["input_cost_per_token"]), float(entry.get("output_cost_per_token", 0.0))
            except (TypeError, ValueError):
                return None
    return None


def price(model: str, input_tokens: int, output_tokens: int) -> float | None:
    """USD for one call's tokens, or None when the table does not price ``model``."""
    rates = model_price(model)
    if rates is None:
        return None
    return input_tokens * rates[0] + output_tokens * rates[1]


def estimate_tokens(prompt: str | Sequence[Mapping[str, Any]]) -> int:
    """Tokens of a prompt or of chat messages' contents, at the usual ~4 characters per token: what
    budgets refuse a batch by and what the rate limiter charges before the reply says the real count."""
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, Sequence):
        text = "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, Mapping))
    else:
        text = str(prompt)
    return max(1, (len(text) + 3) // 4)
