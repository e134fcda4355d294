"""Benchmark: how close the fleet runs to a provider's rate limit with DEFAULT settings.

The stub LLM acts as a provider allowing R requests/s (a one-second token bucket), stating its
limit on every reply (OpenAI's header format unless told otherwise) and answering 429 with
``Retry-After`` beyond it. A fleet of ``--workers`` ``llm`` worker processes x ``--threads``
threads answers one batch of about R x ``--seconds`` prompts sent the way a run sends them
(``Fanout``: one Celery group), with no rate-limit setting at all. Printed per case, counted at
the stub: requests served per second (after the first ``--settle`` seconds, and over the whole
batch), the share of throttled (429) replies, and the rate the fleet's limiter settled on.

Cases: R=20 and R=200 with OpenAI headers, the other two header formats, and R=50 without any
headers (AIMD probing). Run: ``python bench/ratelimit.py`` from the repo root (``--cases
openai:20,none:50`` picks some).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import redis  # noqa: E402

from bench._common import Column, command_line, print_table  # noqa: E402
from rlmq.celery_config import point_at  # noqa: E402
from rlmq.local_redis import start_private_redis  # noqa: E402
from rlmq.settings import Settings  # noqa: E402
from tasks.app import app  # noqa: E402
from tests.support.fleet import Fleet  # noqa: E402
from tests.support.stub_llm import StubLLM  # noqa: E402
from workers.adaptive_limit import AdaptiveLimiter  # noqa: E402
from workers.fanout import Fanout  # noqa: E402

DEFAULT_CASES = "openai:20,openai:200,anthropic:50,openrouter:50,none:50"


@dataclass(frozen=True)
class CaseResult:
    rate: float  # R, the provider's limit (requests/s)
    format: str  # its rate-limit headers
    prompts: int
    errors: int
    wall: float
    overall: float  # requests served per second over the whole batch
    steady_mean: float  # ... per one-second window after the settling time
    steady_min: int
    throttled: float  # share of 429 replies
    learned: float  # the rate the fleet's limiter settled on
    mode: str


COLUMNS: list[Column[CaseResult]] = [
    Column("headers", "10s", lambda r: r.format),
    Column("R/s", "6.0f", lambda r: r.rate),
    Column("prompts", "8d", lambda r: r.prompts),
    Column("steady/s", "9.1f", lambda r: r.steady_mean),
    Column("% of R", ">7s", lambda r: f"{100 * r.steady_mean / r.rate:6.1f}%"),
    Column("min 1-s", "8d", lambda r: r.steady_min),
    Column("overall/s", "10.1f", lambda r: r.overall),
    Column("throttled", ">10s", lambda r: f"{100 * r.throttled:9.2f}%"),
    Column("learned", "8.1f", lambda r: r.learned),
    Column("mode", ">8s", lambda r: r.mode),
    Column("errors", "7d", lambda r: r.errors),
]


def run_case(stub: StubLLM, redis_url: str, fmt: str, rate: float, args: argparse.Namespace) -> CaseResult:
    model = f"openai/bench-{fmt}-{rate:g}"  # its own limiter state in Redis
    settings = Settings(redis_url=redis_url, lm=model, lm_api_base=stub.api_base)
    stub.set_provider_limit(rate, headers=None if fmt == "none" else fmt)
    stub.reset_stats()
    prompts = [f"{model} prompt {i} {time.time()}" for i in range(int(rate * args.seconds))]
    t0 = time.perf_counter()
    answers = Fanout(settings, app=app).query(prompts)
    wall = time.perf_counter() - t0
    stub.set_provider_limit(None)
    records = stub.requests
    ok = sorted(r.at for r in records if r.status == 200)
    throttled = sum(1 for r in records if r.status == 429)
    start, end = ok[0], ok[-1]
    windows = [sum(1 for t in ok if start + k <= t < start + k + 1) for k in range(int(end - start))]
    steady = windows[int(args.settle):] or windows
    state = AdaptiveLimiter(redis.Redis.from_url(redis_url), model).state()
    return CaseResult(rate=rate, format=fmt, prompts=len(prompts), errors=sum(not a.ok for a in answers),
                      wall=wall, overall=len(ok) / max(end - start, 1e-9), steady_mean=statistics.mean(steady),
                      steady_min=min(steady), throttled=throttled / max(1, len(records)),
                      learned=float(state.get("rate", "nan")), mode=state.get("mode", "?"))


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__, argv, cases=(DEFAULT_CASES, "format:R,... (format: openai|anthropic|openrouter|none)"),
                        seconds=(12.0, "batch size = R x this"), settle=(2.0, "seconds left out of the steady rate"),
                        latency=0.05, workers=2, threads=32)
    cases = [(c.split(":")[0], float(c.split(":")[1])) for c in args.cases.split(",")]

    rows: list[CaseResult] = []
    with start_private_redis() as server:
        point_at(app, server.url)
        with StubLLM(latency=args.latency) as stub:
            # no limit settings: defaults; each case's model (its own limiter state) and the warm-up's allowed
            env = {"RLMQ_LM": "openai/bench", "RLMQ_LM_API_BASE": stub.api_base,
                   "RLMQ_ALLOWED_MODELS": "openai/bench-*,openai/warm-up"}
            with Fleet(server.url, env) as fleet:
                workers = [fleet.start("llm", name=f"rl{i}", concurrency=args.threads, wait=False)
                           for i in range(args.workers)]
                fleet.wait_ready(workers, timeout=180)
                warm = Settings(redis_url=server.url, lm="openai/warm-up", lm_api_base=stub.api_base)
                Fanout(warm, app=app).query([f"warm-up {i}" for i in range(2 * args.workers * args.threads)])
                for fmt, rate in cases:
                    row = run_case(stub, server.url, fmt, rate, args)
                    rows.append(row)
                    print(f"  done {fmt}:{rate:g} in {row.wall:.1f}s", flush=True)

    print_table(f"\nstub latency {args.latency * 1000:.0f} ms; {args.workers} llm workers x {args.threads} threads; "
                f"default settings (no RLMQ_RATE_LIMIT_RPS)\n", COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
