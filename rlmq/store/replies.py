"""Redis replies as the types rlmq uses.

rlmq's clients never set ``decode_responses``, so a string reply is ``bytes``; redis-py types every
reply as ``bytes | str`` (it cannot know the client's setting). These take either and give the one
type the caller works with, so a decoding client would also do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["members", "raw", "raw_hash", "text"]


def text(reply: bytes | str) -> str:
    return reply.decode() if isinstance(reply, bytes) else reply


def raw(reply: bytes | str) -> bytes:
    return reply if isinstance(reply, bytes) else reply.encode()


def raw_hash(reply: Mapping[bytes | str, bytes | str]) -> dict[bytes, bytes]:
    """An HGETALL reply with bytes keys and values."""
    return {raw(k): raw(v) for k, v in reply.items()}


def members(reply: Iterable[object]) -> list[str]:
    """The members of a sorted-set range read without scores (redis-py's type also allows pairs)."""
    return [m.decode() if isinstance(m, bytes) else str(m) for m in reply]
