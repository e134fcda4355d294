"""The worker process's shared Redis client (``workers.context``) serves hundreds of runs at once.

A threads-pool rlm worker holds one run per thread, and every run blocks on that client at times (a
limiter slot, a single-flight wait). Real Redis, real blocking commands, one thread per "run".
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from rlmq.client import Client
from workers.context import redis_client

RUNS = 200  # what bench/scale.py puts on one worker; redis-py 8's default pool holds 100


def test_the_shared_client_serves_a_blocking_wait_from_every_run_at_once(redis_url: str) -> None:
    client = redis_client(redis_url)
    prefix = uuid.uuid4().hex
    start = threading.Barrier(RUNS)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        start.wait()
        try:
            client.blpop([f"test:{prefix}:{n}"], timeout=1)  # all RUNS waits open at once
        except redis.RedisError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(RUNS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, f"{len(errors)} of {RUNS} waits failed, e.g. {errors[0]!r}"


@pytest.mark.parametrize("make_client", [lambda url: redis_client(url), lambda url: Client(url).redis],
                         ids=["workers", "client"])
def test_a_refused_password_is_asked_once_not_waited_out(redis_url: str, make_client) -> None:
    """redis-py counts a refused password as a connection error, so the outage policy asked it again for its
    whole budget: 6 times (3 s) before the CLI said "refused the password", 61 (two minutes) in a worker."""
    admin = redis.Redis.from_url(redis_url)
    admin.acl_log_reset()  # Redis logs each refused AUTH there (INFO's counter of them is Redis >= 7.2)
    parts = urlsplit(redis_url)
    wrong = urlunsplit(parts._replace(netloc=f":wrong@{parts.hostname}:{parts.port}"))
    with pytest.raises(redis.AuthenticationError):
        make_client(wrong).ping()
    log = cast("list[dict[str, Any]]", admin.acl_log())  # redis-py 8.2 types the entries loosely
    refusals = [entry for entry in log if entry["reason"] == "auth"]
    assert sum(entry["count"] for entry in refusals) == 1, refusals
    admin.close()
