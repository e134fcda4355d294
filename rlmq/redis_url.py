"""Redis URLs: which ones rlmq accepts, which a worker must refuse (a remote Redis without a password),
and how a client of any kind connects to one — Redis Sentinel included.

A Sentinel deployment is named in Celery's own form, one ``sentinel://`` per Sentinel joined by ``;``,
the Redis servers' password on the first, the database on the last, plus the query arguments
``master_name`` (required) and ``sentinel_password`` (the Sentinels' own ``requirepass``, if set)::

    sentinel://:PASSWORD@h1:26379;sentinel://h2:26379;sentinel://h3:26379/0?master_name=rlmq

Every rlmq Redis client (:func:`connect`) asks the Sentinels for the primary and asks again after a
failover (redis-py's ``SentinelConnectionPool``); Celery gets the same Sentinels, each part with the
password and the database, and the two arguments as its broker and result-backend transport options
(:func:`celery_settings`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlparse

if TYPE_CHECKING:  # redis-py is imported by the clients that connect, not by every reader of settings
    import redis

__all__ = ["SentinelURL", "celery_settings", "connect", "parse_url", "redis_url_argument",
           "unauthenticated_redis_problem"]

SENTINEL = "sentinel"


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``sentinel://`` URL (see the module docstring)."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None
    password: str | None  # the Redis servers'
    sentinel_password: str | None  # the Sentinels'

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        body, _, query = url.strip().partition("?")
        args = {k: v[-1] for k, v in parse_qs(query).items()}
        if not args.get("master_name"):
            raise ValueError("a sentinel:// URL needs ?master_name=NAME (the name the Sentinels monitor)")
        unknown = sorted(set(args) - {"master_name", "sentinel_password"})
        if unknown:
            raise ValueError(f"unknown argument(s) {', '.join(unknown)} in the sentinel:// URL")
        sentinels: list[tuple[str, int]] = []
        username = password = None
        db = 0
        for n, chunk in enumerate(body.split(";")):
            part = urlparse(chunk.strip())
            if part.scheme != SENTINEL or not part.hostname:
                raise ValueError("each ';'-separated part must be sentinel://host:port")
            try:
                sentinels.append((part.hostname, part.port or 26379))
            except ValueError:
                raise ValueError("has a port that is not a number") from None
            if n == 0 and part.password:
                username, password = unquote(part.username or "") or None, unquote(part.password)
            if part.path.strip("/"):
                if not part.path.strip("/").isdigit():
                    raise ValueError("the database after the last Sentinel must be a number, e.g. /0")
                db = int(part.path.strip("/"))
        return cls(tuple(sentinels), args["master_name"], db, username, password, args.get("sentinel_password"))

    def celery_url(self) -> str:
        """Celery's form, without rlmq's query arguments (they go in transport options), and with the
        password and the database in every part: kombu's broker connection takes them from the part it
        is on, and moves to the next part at each failed reconnect (a failover), while Celery's result
        backend takes them from the first. Given once, a fleet's processes would leave a failover on
        different databases (a run's sub-tasks sent to one, the llm workers waiting on another)."""
        auth = f"{self.username or ''}:{self.password}@" if self.password else ""
        return ";".join(f"{SENTINEL}://{auth}{host}:{port}/{self.db}" for host, port in self.sentinels)

    def sentinel_kwargs(self) -> dict[str, Any]:
        """How to talk to the Sentinels: their password, short timeouts, and no retries of one that does
        not answer (the next is asked anyway; redis-py's default retries, nested inside the primary's
        own, stall a client for over a minute when a Sentinel's host is gone)."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return {"socket_timeout": 1.0, "socket_connect_timeout": 1.0, "retry": Retry(NoBackoff(), 0),
                **({"password": self.sentinel_password} if self.sentinel_password else {})}


def is_sentinel(url: str) -> bool:
    return url.strip().startswith(f"{SENTINEL}://")


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A client of ``url`` (``kwargs`` as ``redis.Redis`` takes them); for Sentinel, one of the primary
    that finds the new primary after a failover."""
    import redis

    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    from redis.sentinel import Sentinel

    from rlmq.sentinel_connection import FailoverConnection, FailoverSSLConnection

    parsed = SentinelURL.parse(url)
    # redis-py before 8 leaves Sentinel's constructor and master_for unannotated (8.x annotates them)
    sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=parsed.sentinel_kwargs())  # type: ignore[no-untyped-call,unused-ignore]
    connection_class = FailoverSSLConnection if kwargs.pop("ssl", False) else FailoverConnection
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call,unused-ignore]
        parsed.master_name, redis_class=redis.Redis, db=parsed.db, username=parsed.username,
        password=parsed.password, connection_class=connection_class, **kwargs)
    return client


def celery_settings(url: str) -> dict[str, Any]:
    """Celery's ``broker_url``, ``result_backend`` and, for Sentinel, their transport options."""
    if not is_sentinel(url):
        return {"broker_url": url, "result_backend": url}
    from rlmq.celery_config import BROKER_TRANSPORT_OPTIONS, RESULT_BACKEND_TRANSPORT_OPTIONS

    parsed = SentinelURL.parse(url)
    options = {"master_name": parsed.master_name, "sentinel_kwargs": parsed.sentinel_kwargs()}
    # added to rlmq's own options, which an update with these alone would replace (timeouts, retry policy)
    return {"broker_url": parsed.celery_url(), "result_backend": parsed.celery_url(),
            "broker_transport_options": {**BROKER_TRANSPORT_OPTIONS, **options},
            "result_backend_transport_options": {**RESULT_BACKEND_TRANSPORT_OPTIONS, **options}}


def parse_url(*schemes: str) -> Callable[[str], str]:
    """A parser of URLs with one of ``schemes`` (raises ``ValueError`` with the reason)."""

    def parse(raw: str) -> str:
        value = raw.strip()
        if SENTINEL in schemes and is_sentinel(value):
            SentinelURL.parse(value)
            return value
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
    if is_sentinel(url):
        sentinel = SentinelURL.parse(url)
        if sentinel.password:
            return None
        remote = [h for h, _ in sentinel.sentinels if not _is_loopback(h)]
        return None if not remote else (
            f"REDIS_URL names Sentinels on {remote[0]} without the Redis password: put it in the first part, "
            "e.g. sentinel://:PASSWORD@h1:26379;sentinel://h2:26379/0?master_name=rlmq")
    parsed = urlparse(url)
    if parsed.scheme == "unix" or parsed.password or "password=" in parsed.query:
        return None
    if "ssl_certfile=" in parsed.query and parsed.scheme == "rediss":
        return None  # TLS client certificates authenticate the worker
    host = (parsed.hostname or "").lower()
    if _is_loopback(host):
        return None
    return (f"REDIS_URL points at {host or '?'} without a password: set one on the server (requirepass or an "
            "ACL user) and put it in the URL, e.g. redis://rlmq-worker:PASSWORD@host:6379/0")


def _is_loopback(host: str) -> bool:
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redis_url_argument(raw: str) -> str:
    """``--redis-url``'s value, checked like ``REDIS_URL``."""
    return parse_url("redis", "rediss", "unix", SENTINEL)(raw)
