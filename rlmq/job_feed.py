"""Feeding a corpus job: one small, idempotent step that keeps a job's runs flowing.

``feed_job`` settles the job's runs that have ended (each counted once, ``JobStore.settle``), sends
again a run whose record never got written (its feeder died between reserving and sending), stops
the job once its runs have spent its ``max_cost``, and then starts new runs from the job's cursor
until ``max_active`` are queued or running. It runs when a job is submitted or resumed (client),
when one of its runs ends (``workers.job_feeder``, from the run engine), and in every rlm worker's
maintenance sweep, so a crash anywhere only delays a job. Any number of feeders may run at once:
reserving and settling are Lua steps, and a run fed twice has the same id, which its claim runs once.

Bounded active runs per job is also what keeps the fleet fair: a job never has more than
``max_active`` runs in the rlm queue, so a lone ``rlmq submit`` waits behind at most that many.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from rlmq.run_send import cancel_run, send_run
from rlmq.store import keys, replies
from rlmq.store.blobs import put_blob
from rlmq.store.jobs import ENDED_JOB_TTL_SECONDS, JobSpec, JobStatus, JobStore, item_of_run
from rlmq.store.records import RunSpec, RunStatus, RunStore, Usage

__all__ = ["RESEND_AFTER_SECONDS", "feed_job", "run_usage"]

logger = logging.getLogger(__name__)

# A fed run whose record is missing this long after it was reserved lost its feeder: it is sent. (One
# whose message was lost after it was recorded is sent again as any run is: workers.recovery.resend_queued.)
RESEND_AFTER_SECONDS = 30.0
_ENDED = tuple(status for status in JobStatus if status.finished)


def feed_job(client: redis.Redis, celery: Any, job_id: str, *, expire_seconds: int = ENDED_JOB_TTL_SECONDS) -> int:
    """One feeding step of ``job_id``; how many runs it started. An ended job's keys are given
    ``expire_seconds`` to live (a worker passes its ``RLMQ_RESULT_EXPIRES``, as its run records have)."""
    jobs, runs = JobStore(client), RunStore(client)
    record = jobs.get(job_id)
    if record is None:
        jobs.done_feeding(job_id)
        return 0
    _settle_ended(jobs, runs, celery, record.spec)
    record = jobs.get(job_id)
    assert record is not None
    spec = record.spec
    # a quote's sample is what the decision is made on (``job start``), so a QUOTING job is never stopped
    if (spec.max_cost is not None and record.status not in (JobStatus.QUOTING, *_ENDED)
            and record.usage.get("cost_paid", 0.0) >= spec.max_cost):
        stop = f"its runs spent ${record.usage['cost_paid']:.4f}, the job's max_cost is ${spec.max_cost:g}"
        if jobs.end(job_id, JobStatus.STOPPED, stop):
            logger.warning("job %s STOPPED: %s", job_id, stop)
    status = jobs.status(job_id)
    if status is not None and status.finished:
        active = jobs.active_runs(job_id)
        if status is not JobStatus.DONE:
            for run_id, _ in active:
                cancel_run(runs, celery, run_id)
        if not active:
            jobs.done_feeding(job_id, expire_seconds=expire_seconds)
        return 0
    started = 0
    reserved = jobs.reserve(job_id)
    if reserved:
        items = jobs.items(job_id, [index for _, index in reserved])
        for (run_id, index), item in zip(reserved, items, strict=True):
            send_run(runs, celery, _run_spec(client, spec, run_id, index, item), _described(item), once=True)
            started += 1
    if jobs.status(job_id) is JobStatus.DONE:
        jobs.done_feeding(job_id, expire_seconds=expire_seconds)
    return started


def _settle_ended(jobs: JobStore, runs: RunStore, celery: Any, spec: JobSpec) -> None:
    active = jobs.active_runs(spec.job_id)
    if not active:
        return
    pipe = runs.redis.pipeline(transaction=False)
    for run_id, _ in active:
        pipe.hmget(keys.run_key(run_id), ["status", "progress", "started_at", "finished_at"])
    now = time.time()
    for (run_id, fed_at), fields in zip(active, pipe.execute(), strict=True):
        status_raw, progress_raw, started, finished = (replies.text(f) if f else None for f in fields)
        if status_raw is None:
            if now - fed_at > RESEND_AFTER_SECONDS:
                index = item_of_run(spec.job_id, run_id)
                item = jobs.items(spec.job_id, [index])[0]
                logger.warning("job %s: run %s was reserved but never sent; sending it", spec.job_id, run_id)
                send_run(runs, celery, _run_spec(runs.redis, spec, run_id, index, item), _described(item), once=True)
            continue
        status = RunStatus(status_raw)
        if status.finished:
            progress = json.loads(progress_raw or "{}")
            seconds = float(finished) - float(started) if started and finished else 0.0
            jobs.settle(spec.job_id, run_id, status, run_usage(progress, seconds))


def run_usage(progress: dict[str, Any], seconds: float) -> dict[str, float]:
    """What a job sums of one run: its total usage (``Progress.usage``), its root and sub-call counts, its time."""
    usage = Usage.from_json_dict(progress.get("usage") or {})
    total = usage.total
    return {"cost_paid": total.cost_paid, "cost_uncached": total.cost_uncached, "calls": float(total.calls),
            "cache_hits": float(total.cache_hits), "input_tokens": float(total.input_tokens),
            "output_tokens": float(total.output_tokens), "root_calls": float(usage.root.calls),
            "sub_calls": float(usage.sub.calls), "seconds": round(seconds, 3)}


def _run_spec(client: redis.Redis, spec: JobSpec, run_id: str, index: int, item: dict[str, Any]) -> RunSpec:
    refs = dict(spec.shared)
    refs.update(item.get("refs") or {})
    for name, value in (item.get("inline") or {}).items():
        refs[name] = put_blob(client, value)
    return RunSpec(run_id=run_id, signature=spec.signature, inputs=refs, options=dict(spec.options),
                   tools=list(spec.tools), job=spec.job_id, item=index)


def _described(item: dict[str, Any]) -> dict[str, str]:
    from rlmq.flower_repr import describe_value

    return {name: describe_value(value) for name, value in (item.get("inline") or {}).items()}
