"""Corpus jobs through a real fleet: one rlm worker process with 2 slots, one llm worker, a real Redis
(AOF on, so it can be restarted), local sandboxes, and the stub LLM over HTTP playing a scripted root LM
(one step: ``SUBMIT(answer=llm_query(...))``) and the sub-LM.

What is shown: ``max_active`` is never exceeded (sampled from the run records, not the job's own
counters), the results hold one answer per item in item order, the job's usage is the sum of its
runs' and the stub's own request count; a SIGKILLed rlm worker mid-job still gives exactly one answer
per item (a Redis restart mid-job too, stopped while the llm worker runs a sub-task: it used to exit then,
``workers.broker_close``); ``job resume --retry-failed`` re-runs
exactly the items that failed; a quote's p50/p95 bracket the real cost and its sample is paid once;
``max_cost`` refuses a job at submit and stops one past it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from rlmq.client import Client, ClientError
from rlmq.job_export import export_results
from rlmq.jobs import job_summary, resume_job
from rlmq.local_redis import PrivateRedis, start_private_redis
from rlmq.store import keys
from rlmq.store.jobs import JobStatus, JobStore
from rlmq.store.records import RunStore, Usage
from tests.support.fleet import Fleet, started_fleet, thread_stacks
from tests.support.net import free_port, http_get
from tests.support.reliability import FAST_FAULTS_ENV
from tests.support.screenshots import chromium_missing, screenshot
from tests.support.stub_llm import FaultKind, ScriptedRoot, StubLLM, route
from tests.support.wait import wait_until

pytestmark = [pytest.mark.slow]

SIGNATURE = "doc: str, question: str -> answer: str"
QUESTION = "Which number is in this document?"
STEP = "SUBMIT(answer=llm_query(question + ' | ' + doc))"
# a priced model, so the job's cost is a real sum (the stub's token counts at LiteLLM's price)
WORKER_ENV = {**FAST_FAULTS_ENV, "RLMQ_LM": "openai/gpt-4o-mini", "RLMQ_SUB_LM": "openai/gpt-4o-mini",
              "RLMQ_LM_RETRIES": "0", "OPENAI_API_KEY": "sk-rlmq-test"}


def sub_answer(prompt: str) -> str:
    return "seen " + prompt.rsplit("| ", 1)[-1].strip()


@pytest.fixture(scope="module")
def aof_redis(tmp_path_factory) -> Iterator[dict[str, PrivateRedis]]:
    holder = {"server": start_private_redis(dir=str(tmp_path_factory.mktemp("aof")), appendonly=True)}
    yield holder
    holder["server"].stop()


@pytest.fixture(scope="module")
def fleet(aof_redis, stub: StubLLM) -> Iterator[Fleet]:
    env = {**WORKER_ENV, "RLMQ_LM_API_BASE": stub.api_base}
    with started_fleet(aof_redis["server"].url, env, [("rlm", "rlm1", 2), ("llm", "llmA", 8)], timeout=180) as fl:
        yield fl


@pytest.fixture
def client(fleet: Fleet, aof_redis, stub: StubLLM) -> Iterator[Client]:
    stub.reset()
    stub.set_responder(route(root=ScriptedRoot([STEP]), sub=sub_answer))
    c = Client(aof_redis["server"].url)
    yield c
    c.close()


@pytest.fixture
def ui(client: Client) -> Iterator[str]:
    """``rlmq ui``'s app on a free loopback port: its base URL."""
    from werkzeug.serving import make_server

    from rlmq.ui import create_app

    server = make_server("127.0.0.1", free_port(), create_app(client), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def docs(n: int, tag: str, failing: frozenset[int] = frozenset()) -> Iterator[dict[str, str]]:
    for i in range(n):
        yield {"doc": f"{tag}-doc-{i}" + (" fail-me" if i in failing else "")}


def wait_job(client: Client, job_id: str, timeout: float = 180.0) -> JobStatus:
    def ended() -> JobStatus | None:
        try:
            status = JobStore(client.redis).status(job_id)
        except redis.ConnectionError:
            return None
        return status if status is not None and status.finished else None

    try:
        return wait_until(ended, timeout, f"job {job_id} finished", interval=0.2)
    except AssertionError as exc:  # say where it stuck: the job's counts and its active runs' records
        jobs = JobStore(client.redis)
        active = [(run_id, client.redis.hmget(keys.run_key(run_id), ["status", "attempt", "worker", "error"]))
                  for run_id, _ in jobs.active_runs(job_id)]
        raise AssertionError(f"{exc}; job {jobs.get(job_id)}; active runs {active}") from None


def rows(client: Client, job_id: str) -> list[dict]:
    out = io.StringIO()
    export_results(client, job_id, out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


class ActiveSampler:
    """Counts the job's runs QUEUED or RUNNING, read from their records every 50 ms (a run seen finished
    is not read again: nothing in this job runs an item twice)."""

    def __init__(self, client: Client, job_id: str, n: int) -> None:
        self.r, self.pending = client.redis, [f"{job_id}-{i}" for i in range(n)]
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        while not self.stop.is_set():
            pipe = self.r.pipeline(transaction=False)
            for run_id in self.pending:
                pipe.hget(keys.run_key(run_id), "status")
            statuses = pipe.execute()
            self.samples.append(sum(1 for s in statuses if s in (b"QUEUED", b"RUNNING")))
            self.pending = [run_id for run_id, s in zip(self.pending, statuses, strict=True)
                            if s is None or s in (b"QUEUED", b"RUNNING")]
            time.sleep(0.05)

    def __enter__(self) -> ActiveSampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(5)


def test_a_200_item_job_keeps_max_active_and_answers_every_item_in_order(client: Client, stub: StubLLM, ui: str,
                                                                         tmp_path) -> None:
    started = time.monotonic()
    job_id = client.submit_job(SIGNATURE, {"question": QUESTION}, docs(200, "order"), max_active=3,
                               max_iters=3, max_llm_calls=5)
    with ActiveSampler(client, job_id, 200) as sampler:
        wait_until(lambda: (r := JobStore(client.redis).get(job_id)) and r.settled >= 60, 120, "60 items answered")
        job_page_while_it_runs(ui, job_id, tmp_path)
        # fairness: a lone run submitted mid-job waits behind at most max_active of the job's runs, not the rest
        lone = client.submit(SIGNATURE, {"doc": "lone-doc", "question": QUESTION}, max_iters=3, max_llm_calls=5)
        assert client.wait(lone, timeout=60).status.value == "SUCCEEDED"
        left = JobStore(client.redis).get(job_id)
        assert left is not None and left.status is JobStatus.RUNNING and left.settled < 190
        assert wait_job(client, job_id, timeout=300) is JobStatus.DONE
    elapsed = time.monotonic() - started
    print(f"\nMEASURED 200-item job over 2 rlm slots, max_active 3: {elapsed:.1f}s "
          f"({200 / elapsed * 60:.0f} items/min); peak active {max(sampler.samples)} in {len(sampler.samples)} samples")
    assert max(sampler.samples) <= 3
    assert max(sampler.samples) >= 2  # the job did run in parallel (the sampler can see it)

    answers = rows(client, job_id)
    assert [row["item"] for row in answers] == list(range(200))
    assert [row["status"] for row in answers] == ["SUCCEEDED"] * 200
    assert [row["outputs"]["answer"] for row in answers] == [f"seen order-doc-{i}" for i in range(200)]

    record = JobStore(client.redis).get(job_id)
    assert record is not None and record.counts == {"SUCCEEDED": 200} and record.active == 0
    store = RunStore(client.redis)
    runs = [store.get(row["run_id"]) for row in answers]
    usages = [Usage.from_json_dict(r.progress.to_json_dict()["usage"]).total for r in runs if r is not None]
    # a root + a sub-call each, and the lone run's two
    assert record.usage["calls"] == sum(u.calls for u in usages) == stub.request_count - 2 == 400
    assert record.usage["cost_paid"] == pytest.approx(sum(u.cost_paid for u in usages))
    assert record.usage["cost_paid"] > 0
    lone_usage = [RunStore(client.redis).get(lone)]
    lone_in = sum(r.progress.usage.total.input_tokens for r in lone_usage if r is not None)
    assert record.usage["input_tokens"] == sum(u.input_tokens for u in usages) == stub.tokens_served[0] - lone_in
    summary = job_summary(client, job_id)
    assert summary.eta_seconds is None and summary.failed == []


def job_page_while_it_runs(ui: str, job_id: str, tmp_path) -> None:
    code, page = http_get(f"{ui}/job/{job_id}?page=2")
    assert code == 200 and 'http-equiv="refresh"' in page and "RUNNING" in page
    assert f'href="/run/{job_id}-50"' in page and "seen order-doc-50" in page  # page 2: items 50..99
    assert "order-doc-49" not in page and "page 2 of 4" in page
    assert "<polyline" in page and "items/min" in page
    code, listing = http_get(f"{ui}/jobs")
    assert code == 200 and job_id in listing
    assert http_get(f"{ui}/job/nope")[0] == 404
    missing = chromium_missing()
    if missing is not None:
        print(f"job page checked over HTTP only; Chromium part skipped: {missing}")
        return
    png = screenshot(f"{ui}/job/{job_id}", tmp_path / "job_page_live.png", size="1280,1400", wait_ms=500)
    assert png.stat().st_size > 10_000
    if os.environ.get("RLMQ_SCREENSHOTS"):  # a directory to keep the screenshots in, to look at them
        shots = Path(os.environ["RLMQ_SCREENSHOTS"])
        shots.mkdir(parents=True, exist_ok=True)
        png = Path(shutil.copy(png, shots / "job_page_live.png"))
    print(f"\njob page screenshot: {png}")


def run_a_crashing_job(client: Client, fleet: Fleet, tag: str, crash, timeout: float) -> None:
    """A 40-item job with ``crash()`` after 10 items are answered: it must end with one answer per item."""
    stub_answers = 40
    job_id = client.submit_job(SIGNATURE, {"question": QUESTION}, docs(stub_answers, tag), max_active=4,
                               max_iters=3, max_llm_calls=5)
    jobs = JobStore(client.redis)
    wait_until(lambda: (r := jobs.get(job_id)) and r.settled >= 10, 90, "a few items answered")
    crash()
    crashed = time.monotonic()
    try:
        assert wait_job(client, job_id, timeout=timeout) is JobStatus.DONE
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{thread_stacks([w.child for w in fleet.workers])}") from None
    print(f"\nMEASURED {tag}: the 40-item job DONE {time.monotonic() - crashed:.1f}s after the fault's end")
    answers = rows(client, job_id)
    assert [row["item"] for row in answers] == list(range(stub_answers))
    assert [(row["status"], row["outputs"]["answer"]) for row in answers] == \
        [("SUCCEEDED", f"seen {tag}-doc-{i}") for i in range(stub_answers)]
    record = jobs.get(job_id)
    assert record is not None and record.counts == {"SUCCEEDED": stub_answers}  # each item counted once
    assert len({row["run_id"] for row in answers}) == stub_answers


def test_a_sigkilled_rlm_worker_still_answers_every_item_once(client: Client, fleet: Fleet, stub: StubLLM) -> None:
    stub.latency = 0.2  # runs long enough to be caught mid-flight

    def kill_the_rlm_worker() -> None:
        rlm = next(w for w in fleet.workers if w.queue == "rlm" and w.alive)
        fleet.kill(rlm)  # SIGKILL of the whole worker: its runs and their sandboxes die with it
        fleet.workers.remove(rlm)
        fleet.start("rlm", name=f"rlm-after-{rlm.name.split('@')[0]}", concurrency=2)

    run_a_crashing_job(client, fleet, "kill", kill_the_rlm_worker, timeout=180)


def test_resume_retry_failed_reruns_exactly_the_failed_items(client: Client, stub: StubLLM) -> None:
    failing = frozenset(range(2, 30, 3))  # 10 items whose root call the stub refuses (no retries)
    assert len(failing) == 10
    stub.add_fault(FaultKind.SERVER_ERROR, count=None, marker="fail-me")
    job_id = client.submit_job(SIGNATURE, {"question": QUESTION}, docs(30, "retry", failing), max_active=4,
                               max_iters=3, max_llm_calls=5)
    assert wait_job(client, job_id) is JobStatus.DONE
    first = rows(client, job_id)
    assert {row["item"] for row in first if row["status"] == "FAILED"} == failing
    assert {row["item"] for row in first if row["status"] == "SUCCEEDED"} == set(range(30)) - failing
    summary = job_summary(client, job_id)
    assert {i for i, _, _ in summary.failed} == failing and all(e for _, _, e in summary.failed)

    stub.clear_faults()
    stub.reset_stats()
    assert resume_job(client, job_id, retry_failed=True) == 10
    assert wait_job(client, job_id) is JobStatus.DONE
    after = rows(client, job_id)
    rerun = {row["item"] for row in after if row["run_id"] != first[row["item"]]["run_id"]}
    assert rerun == failing
    assert all(row["status"] == "SUCCEEDED" for row in after)
    assert [row["outputs"]["answer"] for row in after] == \
        [f"seen retry-doc-{i}" + (" fail-me" if i in failing else "") for i in range(30)]
    # only the 10 re-runs reached the LM: one root call and one sub-call each
    assert stub.request_count == 20
    record = JobStore(client.redis).get(job_id)
    assert record is not None and record.counts == {"SUCCEEDED": 30}


def skewed_answer(prompt: str) -> str:
    """The sub-LM's answer to item i is 100 * 3**(i % 5) characters long: per-item cost skewed to the right,
    as real corpora are (most documents short, a few long), so the mean lies between the median and p95."""
    doc = prompt.rsplit("| ", 1)[-1].strip()
    return f"seen {doc} " + "x" * (100 * 3 ** (int(doc.rsplit("-", 1)[-1]) % 5))


def test_a_quote_brackets_the_real_cost_and_its_sample_is_not_paid_again(client: Client, stub: StubLLM) -> None:
    from rlmq.job_quote import quote, start_job, wait_sample

    stub.set_responder(route(root=ScriptedRoot([STEP]), sub=skewed_answer))
    n = 40
    # seed 5 draws two items of each cost level: what is tested is the projection and the sample's reuse, not
    # the luck of the draw (an unlucky sample of 10 from a skewed corpus may miss the mean, as real ones do)
    job_id = client.submit_job(SIGNATURE, {"question": QUESTION}, docs(n, "quote"), max_active=4, sample=10, seed=5,
                               max_iters=3, max_llm_calls=5)
    wait_sample(client, job_id, timeout=120)
    estimate = quote(client, job_id)
    assert estimate.sampled == estimate.answered == 10 and stub.request_count == 20
    assert JobStore(client.redis).status(job_id) is JobStatus.QUOTING  # nothing else ran
    low, high = estimate.projected("cost_paid", 0.5), estimate.projected("cost_paid", 0.95)
    with pytest.raises(ClientError, match="p95 projection"):
        start_job(client, job_id, max_cost=high / 2)
    start_job(client, job_id, max_cost=high * 2)
    assert wait_job(client, job_id) is JobStatus.DONE
    record = JobStore(client.redis).get(job_id)
    assert record is not None and record.counts == {"SUCCEEDED": n}
    real = record.usage["cost_paid"]
    print(f"\nMEASURED quote of {n} items from 10: p50 ${low:.5f}, p95 ${high:.5f}; real ${real:.5f}")
    assert low <= real <= high
    assert stub.request_count == 2 * n  # the sample's 10 items were not run again
    answers = rows(client, job_id)
    assert [row["run_id"] for row in answers] == [f"{job_id}-{i}" for i in range(n)]
    assert all(row["outputs"]["answer"].startswith(f"seen quote-doc-{row['item']} ") for row in answers)


def test_a_job_past_its_max_cost_is_stopped_cleanly(client: Client, stub: StubLLM) -> None:
    from rlmq.job_quote import quote, start_job, wait_sample

    n = 40
    job_id = client.submit_job(SIGNATURE, {"question": QUESTION}, docs(n, "budget"), max_active=2, sample=2,
                               max_iters=3, max_llm_calls=5)
    wait_sample(client, job_id, timeout=60)
    per_run = max(quote(client, job_id).per_item["cost_paid"])
    budget = per_run * 8  # about 8 of the 40 items
    start_job(client, job_id, max_cost=budget, force=True)  # its p95 projection is 5x the budget
    assert wait_job(client, job_id) is JobStatus.STOPPED
    wait_until(lambda: (r := JobStore(client.redis).get(job_id)) and r.active == 0 and r, 30, "its runs ended")
    record = JobStore(client.redis).get(job_id)
    assert record is not None and record.error and "max_cost" in record.error
    assert budget <= record.usage["cost_paid"] <= budget + 3 * per_run  # at most max_active runs past the line
    assert record.settled < n and record.cursor < n
    statuses = {row["status"] for row in rows(client, job_id)}
    assert statuses <= {"SUCCEEDED", "CANCELLED", "NOT_STARTED"} and "NOT_STARTED" in statuses
    assert RunStore(client.redis).active() == []  # no run left running


def test_job_submit_with_max_cost_quotes_first_and_refuses_past_it(client: Client, aof_redis, tmp_path,
                                                                   mp_context) -> None:
    from tests.support.cli import cli_env, rlmq_forked

    (tmp_path / "docs").mkdir()
    for i in range(5):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"cli-doc-{i}")
    env = cli_env(tmp_path, REDIS_URL=aof_redis["server"].url)
    refused = rlmq_forked(mp_context, "job", "submit", "--signature", SIGNATURE, "--each", "doc=@docs/",
                          "--input", f"question={QUESTION}", "--max-cost", "0.00001", "--sample", "2",
                          "--max-iters", "3", env=env, cwd=tmp_path)
    job_id = refused.stdout.strip()
    assert refused.code == 2 and "p95 projection" in refused.stderr and "cost (paid)" in refused.stderr
    assert "item " in refused.stderr and "seen cli-doc-" in refused.stderr  # the sample's answers
    jobs = JobStore(client.redis)
    assert jobs.status(job_id) is JobStatus.QUOTING
    record = jobs.get(job_id)
    assert record is not None and record.settled == 2 and record.total == 5
    started = rlmq_forked(mp_context, "job", "start", job_id, "--max-cost", "100", env=env, cwd=tmp_path)
    assert started.code == 0, started.stderr
    assert wait_job(client, job_id) is JobStatus.DONE
    assert [row["outputs"]["answer"] for row in rows(client, job_id)] == [f"seen cli-doc-{i}" for i in range(5)]


# last in the module: when it fails, its stalled runs hold the rlm slots of the module's fleet
def test_a_redis_restart_still_answers_every_item_once(client: Client, fleet: Fleet, aof_redis, stub: StubLLM) -> None:
    stub.latency = 0.2

    def sub_call_running() -> bool:  # arrived less than half its 0.2-s latency ago: its sub-task is running
        now = time.monotonic()
        return any("| restart-doc-" in req.prompt and now - req.at < 0.1 for req in stub.requests)

    def restart_redis() -> None:
        server = aof_redis["server"]
        # the worst moment: the llm worker holds a running sub-task, unacked (it used to exit then)
        wait_until(sub_call_running, 30, "a sub-call at the stub", interval=0.01)
        server.stop()  # Redis writes its AOF and exits
        time.sleep(4.0)  # longer than the 3-s leases: every claim lapses
        aof_redis["server"] = start_private_redis(server.port, dir=server.dir, appendonly=True,
                                                  password=server.password)

    run_a_crashing_job(client, fleet, "restart", restart_redis, timeout=90)
