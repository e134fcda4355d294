"""The fleet at a glance: ``rlmq workers`` (who serves what, doing what) and ``rlmq stats`` (rates).

``workers`` asks the workers themselves (Celery's remote control ``inspect`` on
``rlmq.celery_config.client_app``: ``active_queues``, ``active``, ``stats``); an ``rlm`` worker's
active tasks are runs (task id = run id), shown with their progress from the run records.
``stats`` reads Redis only: queue depths (Kombu's lists, one per priority step), the per-second
fleet counters the runs and llm workers write (``keys.stats_key``: sub-calls, cache hits, 429s),
live sandbox leases, and runs in progress.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rlmq.celery_config import LLM_TASK, QUEUES, RUN_TASK
from rlmq.store import keys
from rlmq.store.records import Progress, RunStatus

if TYPE_CHECKING:
    from rlmq.client import Client

__all__ = ["fleet_stats", "format_stats", "format_workers", "queue_depth", "workers_view"]

_PRIORITY_SEP = "\x06\x16"  # Kombu's Redis transport: queue "llm" priority 3 lives in "llm\x06\x163"


def workers_view(client: Client, timeout: float = 1.5) -> list[dict[str, Any]]:
    """One dict per worker that answered: name, queues, concurrency, active runs and sub-tasks, totals."""
    inspect = client.celery.control.inspect(timeout=timeout)
    queues = inspect.active_queues() or {}
    active = inspect.active() or {}
    stats = inspect.stats() or {}
    out = []
    for name in sorted(set(queues) | set(active) | set(stats)):
        tasks = active.get(name) or []
        runs = []
        for task in tasks:
            if task.get("name") != RUN_TASK:
                continue
            record = client.store.get(task.get("id", ""))
            progress = record.progress if record else Progress()
            runs.append({"run_id": task.get("id"), "iteration": progress.iteration, "max_iters": progress.max_iters,
                         "llm_calls": progress.llm_calls,
                         "batch": None if progress.batch is None else progress.batch.to_json_dict()})
        info = stats.get(name) or {}
        out.append({
            "name": name,
            "queues": sorted(q.get("name", "?") for q in queues.get(name) or []),
            "concurrency": (info.get("pool") or {}).get("max-concurrency"),
            "active_runs": runs,
            "active_subtasks": sum(1 for t in tasks if t.get("name") == LLM_TASK),
            "processed": dict(info.get("total") or {}),
        })
    return out


def format_workers(workers: list[dict[str, Any]]) -> str:
    if not workers:
        return "no worker answered (is the fleet up? `rlmq up` or `rlmq worker rlm|llm`)"
    lines = []
    for w in workers:
        done = ", ".join(f"{n.split('.')[-1]} {c}" for n, c in sorted(w["processed"].items())) or "none yet"
        lines.append(f"{w['name']}  queues {','.join(w['queues']) or '?'}  concurrency {w['concurrency'] or '?'}  "
                     f"active runs {len(w['active_runs'])}  active sub-tasks {w['active_subtasks']}  processed: {done}")
        for run in w["active_runs"]:
            batch = run.get("batch")
            batch_text = f"  batch {batch['done']}/{batch['total']}" if batch else ""
            lines.append(f"    run {run['run_id']}  iteration {run.get('iteration')}/{run.get('max_iters')}  "
                         f"sub-calls {run['llm_calls']}{batch_text}")
    return "\n".join(lines)


def queue_depth(redis_client: Any, queue: str) -> int:
    names = [queue] + [f"{queue}{_PRIORITY_SEP}{p}" for p in range(1, 10)]
    pipe = redis_client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return sum(int(n) for n in pipe.execute())


def _counter_sum(redis_client: Any, name: str, seconds: int, now: int) -> int:
    values = redis_client.mget([keys.stats_key(name, now - i) for i in range(1, seconds + 1)])
    return sum(int(v) for v in values if v is not None)


def fleet_stats(client: Client, *, window: int = 60, now: float | None = None) -> dict[str, Any]:
    """Queue depths, sub-calls per second, cache hit rate, 429s, live sandboxes, runs in progress."""
    r = client.redis
    second = int(time.time() if now is None else now)
    subcalls = _counter_sum(r, "subcalls", window, second)
    hits = _counter_sum(r, "cache_hits", window, second)
    running = 0
    for run_id in client.store.list(200):
        if client.store.status(run_id) is RunStatus.RUNNING:
            running += 1
    return {
        "queues": {q: queue_depth(r, q) for q in QUEUES},
        "window_seconds": window,
        "subcalls": subcalls,
        "subcalls_per_second": round(subcalls / window, 2),
        "subcalls_per_second_10s": round(_counter_sum(r, "subcalls", 10, second) / 10, 2),
        "cache_hits": hits,
        "cache_hit_rate": round(hits / subcalls, 3) if subcalls else None,
        "rate_limited_429": _counter_sum(r, "ratelimited", window, second),
        "live_sandboxes": int(r.zcount(keys.leases_index_key(), second, "+inf")),
        "runs_running": running,
    }


def format_stats(s: dict[str, Any]) -> str:
    rate = "—" if s["cache_hit_rate"] is None else f"{100 * s['cache_hit_rate']:.0f}%"
    return "\n".join([
        "queues: " + ", ".join(f"{q} {n}" for q, n in s["queues"].items()),
        f"sub-calls: {s['subcalls_per_second']}/s over the last {s['window_seconds']}s "
        f"({s['subcalls_per_second_10s']}/s over 10s), {s['subcalls']} in all",
        f"cache hit rate: {rate} ({s['cache_hits']} hits)",
        f"429s in the last {s['window_seconds']}s: {s['rate_limited_429']}",
        f"live sandboxes: {s['live_sandboxes']}   runs running: {s['runs_running']}",
    ])
