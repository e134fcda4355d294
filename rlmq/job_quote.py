"""What a job will cost before it runs: a random sample of its items run for real, projected.

``quote`` reads the sample's runs (``rlmq.jobs.submit_job(sample=k)`` ran them while the job waited,
QUOTING) and projects each measure to every item: p50 and p95 of the per-item numbers times the job's
item count; the wall time at ``max_active`` runs at once. ``start_job`` starts the job; its sample's
runs are its own runs of those items (the cursor skips them), so they are never paid twice. With a
``max_cost`` a job whose p95 projection exceeds it is refused unless forced, and a running job whose
runs have spent it is STOPPED (``rlmq.job_feed``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlmq.job_feed import feed_job, run_usage
from rlmq.store import keys, replies
from rlmq.store.jobs import JobStatus, JobStore

if TYPE_CHECKING:
    from rlmq.client import Client

__all__ = ["MEASURES", "Quote", "percentile", "quote", "start_job", "wait_sample"]

MEASURES = ("cost_paid", "tokens", "sub_calls", "seconds")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation between the sorted values."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Quote:
    job_id: str
    items: int
    sampled: int
    answered: int
    max_active: int
    per_item: dict[str, list[float]]  # measure -> the sample's values
    answers: list[dict[str, Any]] = field(default_factory=list)  # {item, status, outputs, error}

    def projected(self, measure: str, q: float) -> float:
        """The whole job's total of ``measure`` if every item cost the sample's ``q`` quantile."""
        per_item = percentile(self.per_item[measure], q)
        if measure == "seconds":  # wall time: max_active runs at once
            return per_item * math.ceil(self.items / max(1, self.max_active))
        return per_item * self.items

    def to_json_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "items": self.items, "sampled": self.sampled, "answered": self.answered,
                "projection": {m: {"p50": self.projected(m, 0.5), "p95": self.projected(m, 0.95)} for m in MEASURES},
                "sample": self.answers}

    def lines(self) -> list[str]:
        out = [f"{self.job_id}: {self.sampled} of {self.items} items run ({self.answered} answered); "
               f"projected for all {self.items} (p50 / p95 per item, times the items):"]
        labels = {"cost_paid": ("cost (paid)", "${:.4f}"), "tokens": ("tokens", "{:.0f}"),
                  "sub_calls": ("sub-calls", "{:.0f}"), "seconds": (f"wall time at {self.max_active} at once", "{:.0f}s")}
        for measure in MEASURES:
            label, form = labels[measure]
            out.append(f"  {label:<24} {form.format(self.projected(measure, 0.5))} / "
                       f"{form.format(self.projected(measure, 0.95))}")
        for answer in self.answers:
            shown = json.dumps(answer["outputs"], ensure_ascii=False) if answer["outputs"] is not None else answer["error"]
            out.append(f"  item {answer['item']} {answer['status'].lower()}: {str(shown)[:160]}")
        return out


def wait_sample(client: Client, job_id: str, timeout: float | None = None, interval: float = 0.5) -> None:
    """Until every sampled item's run has ended (``TimeoutError`` after ``timeout`` seconds)."""
    jobs = JobStore(client.redis)
    deadline = None if timeout is None else time.monotonic() + timeout
    want = len(jobs.sampled(job_id))
    while True:
        feed_job(client.redis, client.celery, job_id)  # settles what ended; the workers feed it too
        record = jobs.get(job_id)
        if record is None or record.settled >= want or record.status.finished:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id}: the quote's sample has not finished after {timeout:g}s")
        time.sleep(interval)


def quote(client: Client, job_id: str) -> Quote:
    from rlmq.client import UnknownRun

    jobs = JobStore(client.redis)
    record = jobs.get(job_id)
    if record is None:
        raise UnknownRun(f"no job with id {job_id!r} (see `rlmq job list`)")
    sampled = jobs.sampled(job_id)
    pipe = client.redis.pipeline(transaction=False)
    for index in sampled:
        pipe.hmget(keys.run_key(f"{job_id}-{index}"), ["status", "progress", "started_at", "finished_at", "error"])
        pipe.get(keys.run_result_key(f"{job_id}-{index}"))
    found = pipe.execute()
    per_item: dict[str, list[float]] = {m: [] for m in MEASURES}
    answers = []
    for n, index in enumerate(sampled):
        (status, progress, started, finished, error), result = found[2 * n], found[2 * n + 1]
        if status is None or not finished:
            continue
        seconds = float(finished) - float(started) if started else 0.0
        usage = run_usage(json.loads(progress or "{}"), seconds)
        per_item["cost_paid"].append(usage["cost_paid"])
        per_item["tokens"].append(usage["input_tokens"] + usage["output_tokens"])
        per_item["sub_calls"].append(usage["sub_calls"])
        per_item["seconds"].append(seconds)
        answers.append({"item": index, "status": replies.text(status),
                        "outputs": json.loads(result)["outputs"] if result else None,
                        "error": replies.text(error) if error else None})
    total = record.total if record.total is not None else record.stored
    return Quote(job_id, total, len(sampled), sum(1 for a in answers if a["outputs"] is not None),
                 record.spec.max_active, per_item, answers)


def start_job(client: Client, job_id: str, *, max_cost: float | None = None, force: bool = False) -> Quote:
    """Start a QUOTING job (``max_cost``: its budget); refused (``ClientError``) if its p95 cost projection
    exceeds ``max_cost`` and not ``force``. Returns the quote it was started on."""
    from rlmq.client import ClientError

    jobs = JobStore(client.redis)
    status = jobs.status(job_id)
    if status is not JobStatus.QUOTING:
        raise ClientError(f"job {job_id} is {status.value if status else 'unknown'}, not QUOTING: nothing to start")
    estimate = quote(client, job_id)
    budget = max_cost if max_cost is not None else jobs.get(job_id).spec.max_cost  # type: ignore[union-attr]
    p95 = estimate.projected("cost_paid", 0.95)
    if budget is not None and p95 > budget and not force:
        raise ClientError(f"job {job_id}: the p95 projection ${p95:.4f} exceeds max_cost ${budget:g}; it was not "
                          f"started (start it anyway: `rlmq job start {job_id} --force`; or `rlmq job cancel {job_id}`)")
    jobs.start(job_id, budget)
    feed_job(client.redis, client.celery, job_id)
    return estimate
