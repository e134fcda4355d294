"""Benchmark: one run over a large corpus, a ``.jsonl`` file submitted with ``rlmq submit``.

    python bench/corpus.py                       # 1,000,000 documents of 1 KB (a ~1 GB file)
    python bench/corpus.py --docs 100000 --steps 5

Writes ``--docs`` documents of ``--doc-bytes`` each as a ``.jsonl`` file (one JSON string a line; or
reads ``--file``), starts a private Redis, the stub LLM as a scripted root LM, and a local stack (one
rlm worker, one llm worker, threads pools), then runs ``rlmq submit --input documents=@FILE`` under
``/usr/bin/time -v``. The root's first step runs ``len(documents)`` and samples 100 of them; each
later step reads ``len(documents)`` again; the last submits. It prints:

- the client's peak RSS (``rlmq submit``, from ``/usr/bin/time``) against the file's size (target <= 2x);
- the run's time to first step (from the submit's start to the first step's end in the trace), with
  the submit's own time and the first step's time in the sandbox;
- each step's execute time (``exec_seconds``: sending and binding the inputs, running the code);
- Redis's peak memory (``used_memory_peak``) and its largest value (target <= 64 MiB);
- the rlm worker's and the sandbox's peak RSS.

The worker is fresh: its first run is the one timed. The machine is shared: run it 2-3 times.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import psutil  # noqa: E402
import redis  # noqa: E402

from bench._common import command_line, every  # noqa: E402
from rlmq.client import Client  # noqa: E402
from rlmq.local_redis import start_private_redis  # noqa: E402
from tests.support.fleet import Fleet  # noqa: E402
from tests.support.stub_llm import ScriptedRoot, StubLLM, route  # noqa: E402

SIGNATURE = "documents: list[str] -> count: int"
FIRST_STEP = ("import random\nprint(len(documents))\nsample = random.sample(documents, 100)\n"
              "print(sum(len(d) for d in sample))")
MIB = 2**20


def write_corpus(path: Path, docs: int, doc_bytes: int) -> None:
    words = [f"w{n}" for n in range(500)]
    rng = random.Random(7)
    with open(path, "w", encoding="utf-8") as handle:
        for n in range(docs):
            head = f"document {n}: "
            body = " ".join(rng.choices(words, k=doc_bytes // 4))[:doc_bytes - len(head)]
            handle.write(json.dumps(head + body) + "\n")


def submit_under_time(env: dict[str, str], path: Path, steps: int) -> tuple[str, float, int]:
    """(run id, seconds, peak RSS bytes) of ``rlmq submit`` run under ``/usr/bin/time -v``."""
    argv = ["/usr/bin/time", "-v", sys.executable, "-m", "rlmq.cli", "submit", "--signature", SIGNATURE,
            "--input", f"documents=@{path}", "--max-iters", str(steps + 2)]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"rlmq submit failed ({done.returncode}): {done.stderr[-2000:]}")
    peak_kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    assert peak_kib, done.stderr
    return done.stdout.strip().splitlines()[-1], seconds, int(peak_kib.group(1)) * 1024


class Peaks:
    """Peak memory while the run works: Redis's ``used_memory``, the rlm worker's RSS (its Celery
    processes), and its sandboxes' RSS (every other process below it), summed."""

    def __init__(self, r: redis.Redis, worker_pid: int) -> None:
        self.r, self.worker = r, psutil.Process(worker_pid)
        self.redis = self.worker_rss = self.sandbox_rss = 0

    def sample(self) -> None:
        self.redis = max(self.redis, int(self.r.info("memory")["used_memory"]))
        worker = sandbox = 0
        for proc in [self.worker, *self.worker.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
                is_worker = "celery" in " ".join(proc.cmdline())
            except psutil.Error:
                continue
            worker, sandbox = (worker + rss, sandbox) if is_worker else (worker, sandbox + rss)
        self.worker_rss, self.sandbox_rss = max(self.worker_rss, worker), max(self.sandbox_rss, sandbox)


def largest_value(client: redis.Redis) -> tuple[int, str]:
    sizes = [(int(client.strlen(key)), key.decode()) for key in client.scan_iter(count=1000)
             if client.type(key) == b"string"]
    return max(sizes)


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__, argv, docs=1_000_000, doc_bytes=1000, steps=3, latency=0.05,
                        file=("", "an existing .jsonl corpus (one JSON value a line) instead of writing one"))
    with tempfile.TemporaryDirectory(prefix="rlmq-corpus-") as scratch:
        path = Path(args.file) if args.file else Path(scratch) / "documents.jsonl"
        if not args.file:
            t = time.perf_counter()
            write_corpus(path, args.docs, args.doc_bytes)
            print(f"wrote {path} ({path.stat().st_size / MIB:.0f} MiB) in {time.perf_counter() - t:.0f}s", flush=True)
        run(path, args)
    return 0


def run(path: Path, args) -> None:
    steps = [FIRST_STEP, *["print(len(documents))"] * (args.steps - 1), "SUBMIT(count=len(documents))"]
    env = {"RLMQ_LM": "openai/scripted-root", "RLMQ_SUB_LM": "openai/stub-sub", "OPENAI_API_KEY": "stub"}
    with start_private_redis() as server, StubLLM(latency=args.latency) as stub, \
            Fleet(server.url, {**env, "RLMQ_LM_API_BASE": stub.api_base}) as fleet:
        stub.set_responder(route(root=ScriptedRoot(steps), sub=lambda prompt: "ok"))
        rlm = fleet.start("rlm", name="corpus-rlm", concurrency=1, wait=False)
        fleet.start("llm", name="corpus-llm", concurrency=4, wait=False)
        fleet.wait_ready(timeout=180)
        r = redis.Redis.from_url(server.url)
        client = Client(server.url)
        peaks = Peaks(r, rlm.proc.pid)
        cli_env = {**os.environ, **env, "RLMQ_LM_API_BASE": stub.api_base, "REDIS_URL": server.url,
                   "PYTHONPATH": str(REPO)}
        with every(0.2, peaks.sample):
            started = time.time()
            run_id, submit_seconds, client_peak = submit_under_time(cli_env, path, args.steps)
            while not client.trace(run_id) and not client.status(run_id).status.finished:
                time.sleep(0.1)
            trace = client.trace(run_id)
            first = trace[0]["started_at"] + trace[0]["seconds"] - started if trace else float("nan")
            record = client.wait(run_id, timeout=3600)
        trace = client.trace(run_id)
        biggest, biggest_key = largest_value(r)
        size = path.stat().st_size
        print(f"\ncorpus {path.name}: {size / MIB:.0f} MiB; run {run_id} {record.status.value}; "
              f"first output {trace[0]['output'].split()[:2] if trace else '-'}")
        print(f"client peak RSS (rlmq submit) {client_peak / MIB:8.0f} MiB = {client_peak / size:.2f} x the file")
        waited = trace[0]["started_at"] - started - submit_seconds if trace else float("nan")
        print(f"time to first step            {first:8.1f} s (the submit {submit_seconds:.1f}s, then the worker "
              f"{waited:.1f}s until step 1 began, step 1 {trace[0]['seconds'] if trace else float('nan'):.1f}s "
              f"of which {trace[0]['exec_seconds'] if trace else float('nan'):.1f}s in the sandbox)")
        print("each step in the sandbox       " + ", ".join(f"{s['exec_seconds']:.2f}" for s in trace) + " s")
        print(f"Redis peak memory             {max(peaks.redis, int(r.info('memory')['used_memory_peak'])) / MIB:8.0f} MiB")
        print(f"largest Redis value           {biggest / MIB:8.1f} MiB ({biggest_key.split(':')[1]})")
        print(f"rlm worker peak RSS           {peaks.worker_rss / MIB:8.0f} MiB; its sandbox's processes "
              f"{peaks.sandbox_rss / MIB:.0f} MiB")
        r.close()
        client.close()


if __name__ == "__main__":
    sys.exit(main())
