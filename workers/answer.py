"""``Answer``: one prompt's outcome, the message an ``llm_batch`` sub-task returns (JSON on the wire).

Built by ``workers.batch_answer`` (on an llm worker), read by ``workers.fanout`` and ``workers.usage``
(in the run's worker): the one type both ends of a sub-call share.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Answer"]


@dataclass
class Answer:
    """One prompt's outcome as an ``llm_batch`` sub-task returns it (JSON on the wire)."""

    text: str | None = None
    error: str | None = None
    cached: bool = False
    usage: dict[str, int] = field(default_factory=dict)
    cost: float | None = None
    worker: str = ""
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None

    def for_sandbox(self) -> str:
        """What sandbox code sees: the text, or ``[ERROR] ...``."""
        # ``ok``, spelled out so that the text is known to be a str
        return self.text if self.error is None and self.text is not None else f"[ERROR] {self.error or 'no answer'}"

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> Answer:
        return cls(**{k: raw[k] for k in ("text", "error", "cached", "usage", "cost", "worker", "attempts") if k in raw})
