"""The job pages of ``rlmq ui``: ``/jobs`` (recent jobs) and ``/job/<id>`` (counts, progress over time,
cost so far and projected, and the items table, ``PAGE_SIZE`` items a page, each linking to its run page).
Everything is read from Redis (``rlmq.jobs``); the page reloads itself while the job works."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from flask import Flask, abort, render_template, request

from rlmq.jobs import job_summary, list_jobs, results_page
from rlmq.store import keys, replies
from rlmq.store.jobs import JobStore
from rlmq.trace import format_money

if TYPE_CHECKING:
    from rlmq.client import Client

__all__ = ["PAGE_SIZE", "add_job_pages"]

PAGE_SIZE = 50
CURVE_POINTS = 400  # runs read to draw the progress curve (evenly spread over the job's items)


def add_job_pages(app: Flask, client: Client, refresh_seconds: int) -> None:
    @app.get("/jobs")
    def jobs() -> str:
        records = list_jobs(client, 100)
        return render_template("jobs.html", jobs=records, money=format_money,
                               refresh=refresh_seconds if any(not r.status.finished for r in records) else None)

    @app.get("/job/<job_id>")
    def job_page(job_id: str) -> str:
        from rlmq.client import ClientError

        try:
            summary = job_summary(client, job_id)
        except ClientError:
            abort(404)
        record = summary.record
        total = record.total if record.total is not None else record.stored
        pages = max(1, -(-total // PAGE_SIZE))
        page = min(max(1, request.args.get("page", 1, type=int) or 1), pages)
        rows = [{**row, "answer": _short(row["outputs"])}
                for row in results_page(client, job_id, (page - 1) * PAGE_SIZE, PAGE_SIZE)]
        return render_template("job.html", s=summary, r=record, total=total, rows=rows, page=page, pages=pages,
                               money=format_money, curve=_curve(client, job_id, total, record.spec.submitted_at),
                               done_pct=100 * record.settled / total if total else 0,
                               refresh=None if record.status.finished else refresh_seconds)


def _short(outputs: Any) -> str:
    if outputs is None:
        return ""
    text = json.dumps(outputs, ensure_ascii=False) if not isinstance(outputs, dict) or len(outputs) != 1 \
        else str(next(iter(outputs.values())))
    return text if len(text) <= 140 else text[:140] + "…"


def _curve(client: Client, job_id: str, total: int, start: float) -> dict[str, Any] | None:
    """An SVG polyline of items ended over time, from up to CURVE_POINTS of the job's runs (evenly spread)."""
    if not total:
        return None
    stride = max(1, total // CURVE_POINTS)
    indices = list(range(0, total, stride))
    run_ids = JobStore(client.redis).latest_runs(job_id, indices)
    pipe = client.redis.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hget(keys.run_key(run_id), "finished_at")
    ends = sorted(float(replies.text(t)) - start for t in pipe.execute() if t)
    if not ends:
        return None
    width, height, span = 600, 120, max(ends[-1], 1e-3)
    points = [(0.0, height)] + [(width * t / span, height - height * (n + 1) / len(indices))
                                for n, t in enumerate(ends)]
    return {"points": " ".join(f"{x:.1f},{y:.1f}" for x, y in points), "width": width, "height": height,
            "seconds": span}
