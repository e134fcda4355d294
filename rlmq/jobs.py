"""Corpus jobs, the client's side: items from files, submit (streamed), status, results, cancel, resume.

    from rlmq import Client
    from rlmq.jobs import each_item
    job_id = Client().submit_job("contract: str, question: str -> answer: str",
                                 shared={"question": "Who may terminate?"},
                                 items=each_item("contract", "@contracts/"), max_active=8)

Items are streamed: at most one chunk (``rlmq.store.jobs.ITEMS_PER_CHUNK`` items) is held in memory,
and runs start while later items are still being stored. The feeding itself is ``rlmq.job_feed``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlmq.inputs import InputError, load_input_value
from rlmq.job_feed import feed_job
from rlmq.run_send import cancel_run
from rlmq.store import keys, replies
from rlmq.store.blobs import encode_blob, put_blob
from rlmq.store.jobs import ITEMS_PER_CHUNK, JobRecord, JobSpec, JobStatus, JobStore, item_of_run, new_job_id
from rlmq.store.records import Usage

if TYPE_CHECKING:
    from rlmq.client import Client

__all__ = ["DEFAULT_MAX_ACTIVE", "INLINE_BYTES", "ItemSource", "JobSummary", "cancel_job", "combine", "each_item",
           "job_summary", "list_jobs", "question_items", "results", "results_page", "resume_job", "submit_job"]

DEFAULT_MAX_ACTIVE = 8  # twice the 4 rlm slots `rlmq up` and compose start
INLINE_BYTES = 2048  # an item value up to this size rides in its chunk; a larger one is a blob
ItemSource = Callable[[], Iterator[dict[str, Any]]]  # re-iterable: a product walks its inner sources again


# ---- where items come from -------------------------------------------------------------------
def each_item(name: str, value: str, *, split: str | None = None) -> ItemSource:
    """One item per file of ``@dir/`` or ``@glob``, per line of ``@file.jsonl``, per ``split`` piece of a
    text file, or per element of a ``@file.json`` list, with the value as input ``name``."""
    if not value.startswith("@"):
        raise InputError(f"--each {name}={value!r}: give @dir/, @file.jsonl, @glob or @file with --split")
    path = Path(os.path.expanduser(value[1:]))

    def lines() -> Iterator[dict[str, Any]]:
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield {name: json.loads(line)}
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{path} line {lineno} is not valid JSON: {exc.msg}") from None

    def files() -> Iterator[dict[str, Any]]:
        entries = sorted(e.name for e in os.scandir(path) if not e.name.startswith(".") and e.is_file())
        if not entries:
            raise InputError(f"--each directory {path} has no regular, non-hidden files")
        for entry in entries:
            yield {name: load_input_value("@" + str(path / entry))}

    def pieces() -> Iterator[dict[str, Any]]:
        loaded = load_input_value(value, split=split)
        for piece in loaded if isinstance(loaded, list) else [loaded]:
            yield {name: piece}

    if path.is_dir():
        return files
    if path.suffix.lower() == ".jsonl" and path.is_file():
        return lines
    return pieces


def question_items(name: str, path: str) -> ItemSource:
    """One item per non-empty line of a text file (``--questions``)."""
    def lines() -> Iterator[dict[str, Any]]:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield {name: line.strip()}

    if not os.path.isfile(os.path.expanduser(path)):
        raise InputError(f"--questions file {path} does not exist")
    return lines


def combine(sources: list[ItemSource], *, zipped: bool = False) -> ItemSource:
    """Several ``--each``: every combination (the first varies slowest), or zipped (equal lengths)."""
    if len(sources) == 1:
        return sources[0]

    def product() -> Iterator[dict[str, Any]]:
        def walk(depth: int, acc: dict[str, Any]) -> Iterator[dict[str, Any]]:
            if depth == len(sources):
                yield dict(acc)
                return
            for item in sources[depth]():
                yield from walk(depth + 1, {**acc, **item})
        yield from walk(0, {})

    def zipped_items() -> Iterator[dict[str, Any]]:
        for parts in itertools.zip_longest(*(s() for s in sources)):
            if any(p is None for p in parts):
                raise InputError("--zip: the --each sources have different lengths")
            yield {k: v for part in parts for k, v in part.items()}

    return zipped_items if zipped else product


# ---- submit ----------------------------------------------------------------------------------
def submit_job(client: Client, signature: str, shared: dict[str, Any], items: Iterable[dict[str, Any]], *,
               max_active: int | None = None, max_cost: float | None = None,
               tools: list[str] | tuple[str, ...] = (), job_id: str | None = None, sample: int | None = None,
               seed: int | None = None, **options: Any) -> str:
    """Store the job and stream its items in; runs start with the first chunk. Returns the job id.

    ``sample``: a quote (``rlmq.job_quote``): only a random sample of that many items is run (``seed``
    makes the choice repeatable) and the job waits, QUOTING, for ``job_quote.start_job``."""
    from rlmq.client import ClientError, check_signature

    input_names = check_signature(signature)
    iterator = iter(items)
    first = next(iterator, None)
    if first is None:
        raise ClientError("the job has no items")
    item_fields = sorted(first)
    both = sorted(set(shared) & set(item_fields))
    if both:
        raise ClientError(f"input(s) {', '.join(both)} are given both as shared inputs and per item")
    unknown = sorted((set(shared) | set(item_fields)) - set(input_names))
    missing = sorted(set(input_names) - set(shared) - set(item_fields))
    if unknown:
        raise ClientError(f"input(s) {', '.join(unknown)} are not in the signature's inputs ({', '.join(input_names)})")
    if missing:
        raise ClientError(f"missing input(s) {', '.join(missing)} for the signature (give them with --input "
                          "or per item with --each)")
    max_active = DEFAULT_MAX_ACTIVE if max_active is None else max_active
    if max_active < 1:
        raise ClientError("max_active must be at least 1")
    if max_cost is not None and max_cost <= 0:
        raise ClientError("max_cost must be a positive number of dollars")
    run_options, tool_paths = client.checked_options(options, tools)
    spec = JobSpec(job_id=job_id or new_job_id(), signature=signature,
                   shared={name: put_blob(client.redis, value) for name, value in shared.items()},
                   item_fields=item_fields, options=run_options, tools=tool_paths, max_active=max_active,
                   max_cost=max_cost)
    jobs = JobStore(client.redis)
    if sample is not None and sample < 1:
        raise ClientError("a quote's sample must be at least 1 item")
    client.call("submit job", lambda: jobs.create(spec, quoting=sample is not None))
    count = 0
    for chunk in _chunks(itertools.chain([first], iterator)):
        lines = [_stored_item(client, spec, count + n, item) for n, item in enumerate(chunk)]
        client.call("submit job", lambda: jobs.append_items(spec.job_id, count, lines))  # noqa: B023
        count += len(lines)
        if count == len(lines):  # the first chunk: runs start while the rest is stored
            client.call("feed job", lambda: feed_job(client.redis, client.celery, spec.job_id))
    client.call("submit job", lambda: jobs.seal(spec.job_id, count))
    if sample is not None:  # chosen once every item is stored: each is as likely
        chosen = random.Random(seed).sample(range(count), min(sample, count))
        client.call("submit job", lambda: jobs.sample(spec.job_id, chosen))
    client.call("feed job", lambda: feed_job(client.redis, client.celery, spec.job_id))
    return spec.job_id


def _chunks(items: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Chunks that end on ITEMS_PER_CHUNK boundaries, so a chunk maps to one Redis list."""
    while True:
        chunk = list(itertools.islice(items, ITEMS_PER_CHUNK))
        if not chunk:
            return
        yield chunk


def _stored_item(client: Client, spec: JobSpec, index: int, item: dict[str, Any]) -> str:
    from rlmq.client import ClientError

    if sorted(item) != spec.item_fields:
        raise ClientError(f"item {index} has inputs {', '.join(sorted(item))}; the job's items have "
                          f"{', '.join(spec.item_fields)}")
    refs, inline = {}, {}
    for name, value in item.items():
        if value in ("", [], {}, None):
            raise ClientError(f"item {index}: input {name} is empty")
        short = isinstance(value, str) and len(value) * 4 <= INLINE_BYTES  # UTF-8: at most 4 bytes a character
        if not short and len(encode_blob(value)[1]) > INLINE_BYTES:
            refs[name] = put_blob(client.redis, value, chunk_bytes=client.blob_chunk_bytes)
        else:
            inline[name] = value
    return json.dumps({"refs": refs, "inline": inline}, ensure_ascii=False, allow_nan=False)


# ---- status ----------------------------------------------------------------------------------
@dataclass
class JobSummary:
    record: JobRecord
    throughput: float  # items settled per minute since submit
    eta_seconds: float | None
    projected_cost: float | None  # the cost so far, scaled to every item
    failed: list[tuple[int, str, str]]  # (item, status, one-line reason), the first few
    slowest: list[tuple[int, str, float]]  # (item, run id, seconds running), the longest-running active runs

    def to_json_dict(self) -> dict[str, Any]:
        return {**self.record.to_json_dict(), "throughput_per_min": round(self.throughput, 3),
                "eta_seconds": self.eta_seconds, "projected_cost": self.projected_cost,
                "failed": [{"item": i, "status": s, "error": e} for i, s, e in self.failed],
                "slowest": [{"item": i, "run_id": run, "seconds": round(t, 1)} for i, run, t in self.slowest]}

    def lines(self) -> list[str]:
        r = self.record
        total = "?" if r.total is None else str(r.total)
        counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(r.counts.items())) or "none ended"
        out = [f"{r.spec.job_id}  {r.status.value}  {r.settled}/{total} items ended ({counts}), {r.active} active"
               f" (max {r.spec.max_active})"]
        eta = "" if self.eta_seconds is None else f", ETA {self.eta_seconds:.0f}s"
        projected = "" if self.projected_cost is None else f", projected ${self.projected_cost:.4f}"
        out.append(f"  {self.throughput:.1f} items/min{eta}; cost ${r.usage.get('cost_paid', 0.0):.4f}{projected}"
                   f"; {int(r.usage.get('calls', 0))} LM calls, "
                   f"{int(r.usage.get('input_tokens', 0) + r.usage.get('output_tokens', 0))} tokens")
        if r.error:
            out.append(f"  {r.error}")
        out.extend(f"  item {i} running for {t:.0f}s ({run})" for i, run, t in self.slowest)
        out.extend(f"  item {i} {s.lower()}: {e}" for i, s, e in self.failed)
        return out


def job_summary(client: Client, job_id: str, *, failed_shown: int = 10) -> JobSummary:
    from rlmq.client import UnknownRun

    jobs = JobStore(client.redis)
    record = client.call("job status", lambda: jobs.get(job_id))
    if record is None:
        raise UnknownRun(f"no job with id {job_id!r} (see `rlmq job list`)")
    end = record.finished_at or time.time()
    minutes = max(end - record.spec.submitted_at, 1e-6) / 60
    throughput = record.settled / minutes
    total = record.total if record.total is not None else record.stored
    remaining = total - record.settled
    eta = remaining / throughput * 60 if throughput > 0 and not record.status.finished else None
    cost = record.usage.get("cost_paid", 0.0)
    projected = cost / record.settled * total if record.settled else None
    unanswered = sorted(jobs.unanswered(job_id).items())[:failed_shown]
    failed = []
    if unanswered:
        run_ids = jobs.latest_runs(job_id, [i for i, _ in unanswered])
        errors = [client.redis.hget(keys.run_key(run_id), "error") for run_id in run_ids]
        failed = [(i, s, replies.text(e) if e else "") for (i, s), e in zip(unanswered, errors, strict=True)]
    return JobSummary(record, throughput, eta, projected, failed, _slowest(client, jobs, job_id))


def _slowest(client: Client, jobs: JobStore, job_id: str, shown: int = 3) -> list[tuple[int, str, float]]:
    active = [run_id for run_id, _ in jobs.active_runs(job_id)]
    if not active:
        return []
    pipe = client.redis.pipeline(transaction=False)
    for run_id in active:
        pipe.hget(keys.run_key(run_id), "started_at")
    now = time.time()
    running = [(item_of_run(job_id, run_id), run_id, now - float(replies.text(started)))
               for run_id, started in zip(active, pipe.execute(), strict=True) if started]
    return sorted(running, key=lambda r: -r[2])[:shown]


# ---- results ---------------------------------------------------------------------------------
def results(client: Client, job_id: str, batch: int = 500) -> Iterator[dict[str, Any]]:
    """One row per item in item order: its latest run's id, status, outputs (if answered), error, usage."""
    from rlmq.client import UnknownRun

    jobs = JobStore(client.redis)
    record = jobs.get(job_id)
    if record is None:
        raise UnknownRun(f"no job with id {job_id!r} (see `rlmq job list`)")
    total = record.total if record.total is not None else record.stored
    pending: list[tuple[int, str]] = []
    for pair in jobs.scan_runs(job_id, total, batch):
        pending.append(pair)
        if len(pending) == batch:
            yield from _rows(client, pending)
            pending = []
    yield from _rows(client, pending)


def results_page(client: Client, job_id: str, first: int, count: int) -> list[dict[str, Any]]:
    """Rows ``first..first+count`` (as ``results``), for a paged view."""
    record = JobStore(client.redis).get(job_id)
    total = 0 if record is None else (record.total if record.total is not None else record.stored)
    indices = list(range(first, min(total, first + count)))
    return list(_rows(client, list(zip(indices, JobStore(client.redis).latest_runs(job_id, indices), strict=True))))


def _rows(client: Client, pairs: list[tuple[int, str]]) -> Iterator[dict[str, Any]]:
    pipe = client.redis.pipeline(transaction=False)
    for _, run_id in pairs:
        pipe.hmget(keys.run_key(run_id), ["status", "error", "progress"])
        pipe.get(keys.run_result_key(run_id))
    replies_ = pipe.execute()
    for n, (index, run_id) in enumerate(pairs):
        (status, error, progress), result = replies_[2 * n], replies_[2 * n + 1]
        usage = Usage.from_json_dict(json.loads(progress or "{}").get("usage") or {})
        yield {"item": index, "run_id": run_id, "status": replies.text(status) if status else "NOT_STARTED",
               "outputs": json.loads(result)["outputs"] if result else None,
               "error": replies.text(error) if error else None, "usage": usage.to_json_dict()["total"]}


# ---- control ---------------------------------------------------------------------------------
def cancel_job(client: Client, job_id: str) -> JobStatus:
    """No new runs; the queued and running ones are cancelled (their sandboxes deleted)."""
    from rlmq.client import UnknownRun

    jobs = JobStore(client.redis)
    if jobs.status(job_id) is None:
        raise UnknownRun(f"no job with id {job_id!r} (see `rlmq job list`)")
    jobs.end(job_id, JobStatus.CANCELLED, "cancelled")
    for run_id, _ in jobs.active_runs(job_id):
        cancel_run(client.store, client.celery, run_id)
    feed_job(client.redis, client.celery, job_id)  # settles what ended at once
    status = jobs.status(job_id)
    assert status is not None
    return status


def resume_job(client: Client, job_id: str, *, retry_failed: bool = False) -> int:
    """Feed the job again: items never started, and with ``retry_failed`` those whose run ended unanswered
    (their sub-calls answered from the cache). Returns how many items are queued to run again."""
    from rlmq.client import ClientError, UnknownRun

    jobs = JobStore(client.redis)
    if jobs.status(job_id) is None:
        raise UnknownRun(f"no job with id {job_id!r} (see `rlmq job list`)")
    feed_job(client.redis, client.celery, job_id)  # settle what has ended before choosing what to retry
    n = jobs.resume(job_id, retry=retry_failed)
    if n < 0:
        raise ClientError(f"job {job_id} is still being submitted or quoted (start a quoted job with `rlmq job start`)")
    feed_job(client.redis, client.celery, job_id)
    return n


def list_jobs(client: Client, limit: int = 20) -> list[JobRecord]:
    jobs = JobStore(client.redis)
    ids = jobs.recent(limit)
    records = [jobs.get(j) for j in ids]
    jobs.forget_missing([j for j, r in zip(ids, records, strict=True) if r is None])  # expired with their runs
    return [r for r in records if r is not None]

