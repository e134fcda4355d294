"""The worker process's shared Redis client (``workers.context``) serves hundreds of runs at once.

A threads-pool rlm worker holds one run per thread, and every run blocks on that client at times (a
limiter slot, a single-flight wait). Real Redis, real blocking commands, one thread per "run".
"""

from __future__ import annotations

import threading
import uuid

import redis

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
