"""Loopback ports and plain HTTP GETs for tests that talk to servers they started."""

from __future__ import annotations

import base64
import socket
import urllib.error
import urllib.request

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["free_port", "http_get", "http_status", "one_try_redis"]


def free_port() -> int:
    """A loopback port nothing listens on now (never a fixed one: other stacks share this machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, auth: str | None = None, timeout: float = 10) -> tuple[int, str]:
    """(status, body) of a GET (basic auth ``user:password`` if given); (0, "") when nothing answers."""
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def http_status(url: str, auth: str | None = None) -> int:
    """The HTTP status of a GET; 0 when nothing answers."""
    return http_get(url, auth, timeout=5)[0]


def one_try_redis(url: str | None = None, **kwargs) -> redis.Redis:
    """A Redis client that gives up at the first refusal: redis-py retries connection errors with backoff,
    an AuthenticationError among them (seconds per check that a server refuses a client)."""
    kwargs["retry"] = Retry(NoBackoff(), 0)
    return redis.Redis.from_url(url, **kwargs) if url else redis.Redis(**kwargs)
