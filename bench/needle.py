"""Benchmark: a 500-document needle search, rlmq vs DSPy in-process, against a rate-limited provider.

The stub LLM acts as a provider allowing ``--rps`` requests/s (default 100; OpenAI rate-limit
headers on every reply, 429 + ``Retry-After`` beyond) with ``--latency`` seconds per reply
(default 0.25). A scripted root LM (``ScriptedRoot``) writes the same two steps for both:
``llm_query_batched`` over every document ("the code, or NO"), then ``SUBMIT`` the hit.

  (a) DSPy 3.4 in one process: plain ``dspy.RLM`` with its built-in ``llm_query_batched``
      (8 threads) and DSPy's own ``LocalInterpreter`` (DSPy's default ``PythonInterpreter``
      needs Deno + Pyodide downloads, which this offline machine cannot make);
  (b) rlmq with DEFAULT settings (no rate-limit setting): a ``run_rlm`` submitted through
      ``rlmq.Client`` to one ``rlm`` worker (threads pool, the default) and one ``llm`` worker (32 threads),
      the fleet's limiter learning the provider's limit from its replies.

Each side runs ``--repeats`` times (fresh documents each time, so no cache hits) after one
untimed warm-up run; with ``--cold`` there is no warm-up, so rlmq's first timed run is a fresh
worker's first run. ``--no-headers`` makes the provider a header-less one with no limit (vLLM,
Ollama, most proxies); ``--llm-workers`` sets how many llm workers (32 threads each) serve.
Prints each wall time and the ratio (a)/(b). Run: ``python bench/needle.py``;
``python bench/needle.py --cold`` and ``python bench/needle.py --cold --no-headers --llm-workers 2``.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402

from bench._common import command_line  # noqa: E402
from rlmq.client import Client  # noqa: E402
from rlmq.local_redis import start_private_redis  # noqa: E402
from rlmq.store.records import RunStatus  # noqa: E402
from tests.support.fleet import Fleet  # noqa: E402
from tests.support.stub_llm import ScriptedRoot, StubLLM, route  # noqa: E402

SIGNATURE = "docs: list[str] -> code: str"
STEPS = [
    "answers = llm_query_batched(['Reply with the secret code in this document, or NO.\\n\\n' + d for d in docs])\n"
    "hits = [a for a in answers if a != 'NO']\n"
    "print(len(answers), hits)",
    "SUBMIT(code=hits[0])",
]
_CODE = re.compile(r"the secret code is (\w+)")


def sub_answer(prompt: str) -> str:
    found = _CODE.search(prompt)
    return found.group(1) if found else "NO"


def make_docs(n: int) -> tuple[list[str], str]:
    salt = uuid.uuid4().hex[:8]
    code = f"K{salt}"
    docs = [f"Document {i} ({salt}): ledger entries, shipping notes and weather for day {i}." for i in range(n)]
    docs[n * 2 // 3] += f" Between the lines: the secret code is {code}."
    return docs, code


def dspy_in_process(stub: StubLLM, n: int) -> float:
    docs, code = make_docs(n)
    root = dspy.LM("openai/scripted-root", api_base=stub.api_base, api_key="stub", cache=False)
    sub = dspy.LM("openai/stub-sub", api_base=stub.api_base, api_key="stub", cache=False)
    rlm = dspy.RLM(SIGNATURE, sub_lm=sub, max_iters=6, max_llm_calls=n + 10, interpreter_factory=dspy.LocalInterpreter)
    t0 = time.perf_counter()
    with dspy.context(lm=root):
        result = rlm(docs=docs)
    elapsed = time.perf_counter() - t0
    assert result.code == code, result
    return elapsed


def rlmq_run(client: Client, n: int) -> float:
    docs, code = make_docs(n)
    t0 = time.perf_counter()
    run_id = client.submit(SIGNATURE, {"docs": docs}, max_iters=6, max_llm_calls=n + 10)
    record = client.wait(run_id, timeout=600)
    elapsed = time.perf_counter() - t0
    assert record.status is RunStatus.SUCCEEDED, record
    assert client.result(run_id)["outputs"]["code"] == code
    return elapsed


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__, argv, docs=500, rps=100.0, latency=0.25, repeats=2,
                        cold=(False, "no warm-up run: time fresh workers' first runs"),
                        no_headers=(False, "a provider with no limit and no headers"), llm_workers=1)

    dspy_times: list[float] = []
    rlmq_times: list[float] = []
    throttled: list[tuple[str, int, int]] = []  # (side, 429 replies, requests)
    with start_private_redis() as server, StubLLM(latency=args.latency) as stub:
        stub.set_responder(route(root=ScriptedRoot(STEPS), sub=sub_answer))
        if not args.no_headers:
            stub.set_provider_limit(args.rps, headers="openai")
        env = {"RLMQ_LM": "openai/scripted-root", "RLMQ_SUB_LM": "openai/stub-sub",
               "RLMQ_LM_API_BASE": stub.api_base,  # nothing about rate limits: the defaults
               # one sub-call per document: the workers' own cap must allow what each run asks for
               "RLMQ_MAX_LLM_CALLS": str(args.docs + 10)}
        with Fleet(server.url, env) as fleet:
            workers = [fleet.start("rlm", name="needle-rlm", concurrency=2, wait=False)]
            workers += [fleet.start("llm", name=f"needle-llm{i}", concurrency=32, wait=False)
                        for i in range(args.llm_workers)]
            fleet.wait_ready(workers, timeout=180)
            client = Client(server.url)
            dspy_in_process(stub, 20)  # DSPy's imports are paid by this process either way
            if not args.cold:
                rlmq_run(client, 20)  # warm-up, untimed
            for _ in range(args.repeats):
                for side, fn, times in (("dspy", lambda: dspy_in_process(stub, args.docs), dspy_times),
                                        ("rlmq", lambda: rlmq_run(client, args.docs), rlmq_times)):
                    time.sleep(1.5)  # the provider's bucket refills between runs
                    stub.reset_stats()
                    times.append(fn())
                    throttled.append((side, sum(r.status == 429 for r in stub.requests), stub.request_count))
                    print(f"  {side}: {times[-1]:.2f}s", flush=True)

    provider = "no limit, no headers" if args.no_headers else f"{args.rps:g} requests/s (OpenAI headers)"
    print(f"\n{args.docs} documents, provider {provider}, latency {args.latency * 1000:.0f} ms, rlmq on default "
          f"settings, {args.llm_workers} llm worker(s) x 32 threads, {'cold' if args.cold else 'after a warm-up'}")
    print(f"(a) DSPy in-process, 8 threads : {', '.join(f'{t:.2f}' for t in dspy_times)} s")
    print(f"(b) rlmq fleet                 : {', '.join(f'{t:.2f}' for t in rlmq_times)} s")
    print("throttled replies (429 / requests): " + ", ".join(f"{s} {t}/{n}" for s, t, n in throttled))
    ratio = statistics.median(dspy_times) / statistics.median(rlmq_times)
    first = dspy_times[0] / rlmq_times[0]
    print(f"ratio (a)/(b), medians: {ratio:.2f}x; first runs: {first:.2f}x")
    if not args.no_headers:
        print(f"(ideal at {args.rps:g}/s: {(args.docs * args.latency / 8) / (args.docs / args.rps):.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
