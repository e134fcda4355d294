"""What an rlm worker pays for a run's first root-LM call: wall and CPU time, and whether LiteLLM got imported.

    python bench/first_root_call.py [--model openai/gpt-4o-mini] [--client auto]

A fresh process loads what a run worker has loaded before its first call (``workers.engines``), then
sends one request through ``fleet_root_lm`` (fleet limiter, LM client, pricing) to the stub LLM on a
private Redis, and a second one for comparison. Under ``--client auto`` an ``openai/...`` model with an
api base goes over direct HTTP, which should never import LiteLLM (~6 s of CPU on a 2-core box).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def timed(call) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="openai/gpt-4o-mini")
    parser.add_argument("--client", default="auto", choices=("auto", "http", "litellm"))
    args = parser.parse_args()

    from rlmq.local_redis import start_private_redis
    from tests.support.stub_llm import StubLLM

    load_wall, load_cpu = timed(lambda: __import__("workers.engines"))
    from rlmq.settings import LMClient, Settings
    from workers.engines import fleet_root_lm

    redis = start_private_redis()
    stub = StubLLM().start()
    try:
        settings = Settings(redis_url=redis.url, lm=args.model, lm_api_base=stub.api_base,
                            lm_client=LMClient(args.client))
        lm = fleet_root_lm(settings)
        stamp = time.time_ns()  # prompts no cache has seen
        first = timed(lambda: lm(f"first {stamp}"))
        litellm_loaded = "litellm" in sys.modules
        second = timed(lambda: lm(f"second {stamp}"))
    finally:
        stub.stop()
        redis.stop()
    print(f"model {args.model}, client {args.client}")
    print(f"{'':28}{'wall s':>8}{'cpu s':>8}")
    print(f"{'load workers.engines':28}{load_wall:8.2f}{load_cpu:8.2f}")
    print(f"{'first root call':28}{first[0]:8.2f}{first[1]:8.2f}")
    print(f"{'second root call':28}{second[0]:8.2f}{second[1]:8.2f}")
    print(f"litellm imported by the first call: {litellm_loaded}")


if __name__ == "__main__":
    main()
