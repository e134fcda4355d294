"""Redis URLs: which ones rlmq accepts, and which a worker must refuse (a remote Redis without a password)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from urllib.parse import urlparse

__all__ = ["parse_url", "redis_url_argument", "unauthenticated_redis_problem"]


def parse_url(*schemes: str) -> Callable[[str], str]:
    """A parser of URLs with one of ``schemes`` (raises ``ValueError`` with the reason)."""

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


def unauthenticated_redis_problem(url: str) -> str | None:
    """Why a worker must not use ``url``, or None: a Redis off this machine with no password.

    Loopback and Unix sockets are this machine's own business (``rlmq up``'s Redis has a password
    anyway); anywhere else, whoever reaches the port could rewrite runs and caches and enqueue work.
    """
    parsed = urlparse(url)
    if parsed.scheme == "unix" or parsed.password or "password=" in parsed.query:
        return None
    if "ssl_certfile=" in parsed.query and parsed.scheme == "rediss":
        return None  # TLS client certificates authenticate the worker
    host = (parsed.hostname or "").lower()
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (f"REDIS_URL points at {host or '?'} without a password: set one on the server (requirepass or an "
            "ACL user) and put it in the URL, e.g. redis://rlmq-worker:PASSWORD@host:6379/0")


def redis_url_argument(raw: str) -> str:
    """``--redis-url``'s value, checked like ``REDIS_URL``."""
    return parse_url("redis", "rediss", "unix")(raw)
