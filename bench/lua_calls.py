"""What one Lua round trip of the sub-call path costs: a fleet-limiter grant + observe, and a
single-flight miss (acquire, store, release), against a private Redis on loopback.

    python bench/lua_calls.py [--calls 3000]

Prints wall time and this process's CPU per call. Run it from another checkout (``PYTHONPATH=<it>``)
to compare two versions of the scripts on the same box.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from bench._common import command_line
from rlmq.local_redis import start_private_redis
from workers.adaptive_limit import AdaptiveLimiter
from workers.single_flight import ResponseCache

HEADERS = {"x-ratelimit-limit-requests": "1000000", "x-ratelimit-remaining-requests": "999999",
           "x-ratelimit-reset-requests": "1ms"}


def main() -> None:
    calls = command_line(__doc__, calls=3000).calls
    with start_private_redis() as server, redis.Redis.from_url(server.url) as client:
        limiter = AdaptiveLimiter(client, "bench-model", ceiling_rps=1e6, burst=100_000, max_in_flight=128)
        cache = ResponseCache(client, ttl_seconds=60)
        cases = {
            "limiter acquire + done": lambda i: limiter.acquire(tokens=100).done(headers=HEADERS, used_tokens=120),
            "single-flight miss": lambda i: cache.single_flight(f"{i:064d}", lambda: {"text": "x"}, lock_ttl=5,
                                                                wait_timeout=5),
        }
        print(f"{'case':<26} {'wall us/call':>12} {'CPU us/call':>12}")
        for name, call in cases.items():
            for i in range(200):  # warm up: scripts loaded, connections open
                call(-i - 1)
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(calls):
                call(i)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"{name:<26} {wall / calls * 1e6:>12.0f} {cpu / calls * 1e6:>12.0f}")


if __name__ == "__main__":
    main()
