"""Corpus jobs without workers (the fast lane): items stored in bounded chunks, the feed step bounded by
max_active and idempotent, a run's end counted once, and the ``rlmq job`` commands as a user types them
(one-line errors for bad input). The fleet-level tests are in test_jobs.py."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlmq.client import Client, ClientError
from rlmq.job_export import ExportError, export_results
from rlmq.job_feed import feed_job
from rlmq.jobs import cancel_job, job_summary, list_jobs, resume_job
from rlmq.store import keys
from rlmq.store.jobs import ENDED_JOB_TTL_SECONDS, ITEMS_PER_CHUNK, JobStatus, JobStore
from rlmq.store.records import RunStatus, RunStore
from tests.support.cli import cli_env, rlmq_forked

SIGNATURE = "doc: str, question: str -> answer: str"


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    c = Client(redis_url)
    yield c
    c.close()


def test_items_are_stored_in_bounded_chunks_and_max_active_runs_are_fed(client: Client) -> None:
    n = 2 * ITEMS_PER_CHUNK + 500
    job_id = client.submit_job(SIGNATURE, {"question": "q?"}, ({"doc": f"d{i}"} for i in range(n)), max_active=5)
    lengths = [client.redis.llen(keys.job_items_key(job_id, c)) for c in range(4)]
    assert lengths == [ITEMS_PER_CHUNK, ITEMS_PER_CHUNK, 500, 0]
    jobs = JobStore(client.redis)
    record = jobs.get(job_id)
    assert record is not None and (record.status, record.total, record.cursor, record.active) == \
        (JobStatus.RUNNING, n, 5, 5)
    assert [run_id for run_id, _ in jobs.active_runs(job_id)] == [f"{job_id}-{i}" for i in range(5)]
    spec = RunStore(client.redis).get(f"{job_id}-3")
    assert spec is not None and (spec.spec.job, spec.spec.item) == (job_id, 3)
    assert feed_job(client.redis, client.celery, job_id) == 0  # full: feeding again starts nothing


def test_a_run_end_is_counted_once_and_frees_its_place(client: Client) -> None:
    job_id = client.submit_job(SIGNATURE, {"question": "q?"}, ({"doc": f"d{i}"} for i in range(4)), max_active=2)
    runs = RunStore(client.redis)
    assert runs.finish(f"{job_id}-0", RunStatus.FAILED, error="boom")
    assert feed_job(client.redis, client.celery, job_id) == 1
    assert feed_job(client.redis, client.celery, job_id) == 0  # settled once, not twice
    record = JobStore(client.redis).get(job_id)
    assert record is not None and record.counts == {"FAILED": 1} and record.cursor == 3
    assert JobStore(client.redis).unanswered(job_id) == {0: "FAILED"}
    client.redis.hset(keys.run_key(f"{job_id}-2"), "started_at", repr(time.time() - 50))  # as a worker's claim does
    summary = job_summary(client, job_id)
    assert [(i, run) for i, run, _ in summary.slowest] == [(2, f"{job_id}-2")] and summary.slowest[0][2] >= 50
    assert summary.failed == [(0, "FAILED", "boom")]
    assert "item 2 running for 5" in "\n".join(summary.lines())


def test_bad_jobs_are_refused_in_one_line(client: Client) -> None:
    with pytest.raises(ClientError, match="no items"):
        client.submit_job(SIGNATURE, {"question": "q"}, iter([]))
    with pytest.raises(ClientError, match="missing input"):
        client.submit_job(SIGNATURE, {}, iter([{"doc": "d"}]))
    with pytest.raises(ClientError, match="both as shared inputs and per item"):
        client.submit_job(SIGNATURE, {"doc": "x", "question": "q"}, iter([{"doc": "d"}]))
    with pytest.raises(ClientError, match="item 1 has inputs"):
        client.submit_job(SIGNATURE, {"question": "q"}, iter([{"doc": "d"}, {"other": "d"}]))


def test_the_job_commands_as_a_user_types_them(tmp_path: Path, redis_url: str, mp_context) -> None:
    contracts = tmp_path / "contracts"
    contracts.mkdir()
    for i in range(3):
        (contracts / f"c{i}.txt").write_text(f"contract number {i}\n")
    env = cli_env(tmp_path, REDIS_URL=redis_url)

    def run(*args: str):
        return rlmq_forked(mp_context, *args, env=env, cwd=tmp_path)

    done = run("job", "submit", "--signature", "contract: str, question: str -> answer: str",
               "--each", "contract=@contracts/", "--input", "question=Who may terminate?", "--max-active", "2")
    assert done.code == 0, done.stderr
    job_id = done.stdout.strip()
    status = run("job", "status", job_id)
    assert status.code == 0 and "0/3 items ended" in status.stdout and "2 active (max 2)" in status.stdout
    assert run("job", "results", job_id, "-o", "answers.jsonl").code == 0
    lines = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [(row["item"], row["run_id"]) for row in lines] == [(i, f"{job_id}-{i}") for i in range(3)]
    assert [row["status"] for row in lines] == ["QUEUED", "QUEUED", "NOT_STARTED"]
    assert run("job", "results", job_id, "-o", "answers.csv").code == 0
    with open(tmp_path / "answers.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(row["item"], row["run_id"], row["status"]) for row in table] == \
        [(str(i), f"{job_id}-{i}", s) for i, s in enumerate(["QUEUED", "QUEUED", "NOT_STARTED"])]
    assert run("job", "results", job_id, "-o", "answers.parquet").code == 0
    parquet = pq.read_table(tmp_path / "answers.parquet").to_pylist()
    assert [(row["item"], row["run_id"], row["status"], row["tokens"]) for row in parquet] == \
        [(i, f"{job_id}-{i}", s, 0) for i, s in enumerate(["QUEUED", "QUEUED", "NOT_STARTED"])]
    assert job_id in run("job", "list").stdout
    cancelled = run("job", "cancel", job_id)
    assert cancelled.code == 0 and "cancelled" in cancelled.stdout
    status = json.loads(run("job", "status", job_id, "--json").stdout)
    assert status["status"] == "CANCELLED" and status["counts"] == {"CANCELLED": 2} and status["active"] == 0
    watched = run("job", "watch", job_id)  # an ended job: one bar, and the exit code says not all answered
    assert watched.code == 1 and "] 2/3 cancelled" in watched.stderr

    (tmp_path / "corpus.txt").write_text("the one shared corpus\n")
    (tmp_path / "questions.txt").write_text("Who?\n\nWhen?\nWhy?\n")
    asked = run("job", "submit", "--signature", "corpus: str, question: str -> answer: str",
                "--input", "corpus=@corpus.txt", "--questions", "questions.txt")
    assert asked.code == 0, asked.stderr
    record = JobStore(Client(redis_url).redis).get(asked.stdout.strip())
    assert record is not None and record.total == 3 and list(record.spec.shared) == ["corpus"]

    bad = run("job", "submit", "--signature", "contract: str -> answer: str", "--each", "contract=@nowhere/")
    assert bad.code == 2 and bad.stderr.count("\n") == 1 and "nowhere" in bad.stderr
    missing = run("job", "status", "job-nope")
    assert missing.code == 4 and "no job" in missing.stderr


def test_parquet_without_pyarrow_is_one_clear_line(client: Client, tmp_path: Path, monkeypatch) -> None:
    job_id = client.submit_job("contract: str -> answer: str", {}, [{"contract": "c"}], max_active=1)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(ExportError, match="needs pyarrow: pip install pyarrow"):
        export_results(client, job_id, str(tmp_path / "a.parquet"), "parquet")


def test_an_ended_job_expires_with_its_runs_and_a_resumed_one_does_not(client: Client) -> None:
    job_id = client.submit_job(SIGNATURE, {"question": "q?"}, ({"doc": f"d{i}"} for i in range(1500)), max_active=2)
    job_keys = [keys.job_key(job_id), keys.job_items_key(job_id, 0), keys.job_items_key(job_id, 1)]
    assert [client.redis.ttl(k) for k in job_keys] == [-1, -1, -1]  # running: kept
    cancel_job(client, job_id)
    ttls = [client.redis.ttl(k) for k in job_keys]
    assert all(ENDED_JOB_TTL_SECONDS - 60 < t <= ENDED_JOB_TTL_SECONDS for t in ttls), ttls
    assert resume_job(client, job_id) == 0 and [client.redis.ttl(k) for k in job_keys] == [-1, -1, -1]
    client.redis.delete(keys.job_key(job_id))  # as when it expires
    assert job_id not in [r.spec.job_id for r in list_jobs(client)]
    assert job_id not in JobStore(client.redis).recent(1000)  # the index forgets it too
