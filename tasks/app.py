"""The Celery app of the workers: ``rlmq.celery_config`` plus the checks a worker makes at start.

A worker must consume exactly one of the two queues: a worker serving both can deadlock with
every slot in a run waiting on sub-tasks that no free slot will take. ``celeryd_init`` checks
that, the settings, and that a Redis off this machine is reached with a password, and stops
the worker with a one-line error. Every worker process is made non-dumpable from its start
(``workers.hardening``).
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery, signals, states
from kombu import Queue

from rlmq.celery_config import CELERY_CONFIG, LLM_QUEUE, QUEUES, RLM_QUEUE, point_at
from rlmq.redis_url import unauthenticated_redis_problem
from rlmq.settings import SandboxBackend, Settings, SettingsError, redis_url_from_env
from workers.context import worker_settings
from workers.hardening import make_non_dumpable

__all__ = ["PROGRESS_STATE", "WORKER_QUEUES", "app"]

PROGRESS_STATE = "PROGRESS"  # what workers.run_engine reports while a run works

WORKER_QUEUES: set[str] = set()  # the queues this process consumes, when it is a worker

# Runs report a custom PROGRESS state. Celery ranks unknown states above REVOKED, so an events
# monitor (Flower loads this app) would keep a cancelled run in PROGRESS after its task-revoked
# event; rank PROGRESS with STARTED, below every final state.
states.PRECEDENCE_LOOKUP.setdefault(PROGRESS_STATE, states.PRECEDENCE_LOOKUP[states.STARTED])

app = Celery("rlmq")
app.conf.update(CELERY_CONFIG, task_queues=tuple(Queue(q) for q in QUEUES),
                result_expires=Settings().result_expires)

_url = redis_url_from_env()
if _url:
    point_at(app, _url)


@signals.celeryd_init.connect
def _check_worker_start(sender: Any = None, conf: Any = None, options: dict[str, Any] | None = None,
                        **_: Any) -> None:
    """Refuse to start a worker with bad settings or a queue mix that can deadlock."""
    problems: list[str] = []
    try:
        settings = worker_settings()
        insecure = unauthenticated_redis_problem(settings.redis_url)
        if insecure:
            problems.append(insecure)
        if conf is not None:
            conf.broker_url = conf.result_backend = settings.redis_url
    except SettingsError as exc:
        problems.append(str(exc))
    queues = _queue_names((options or {}).get("queues"))
    if not queues:
        problems.append("pass -Q rlm (runs) or -Q llm (sub-LLM calls): a worker serving both can deadlock")
    elif {RLM_QUEUE, LLM_QUEUE} <= queues:
        problems.append("a worker must not consume both 'rlm' and 'llm' (every run slot could wait on "
                        "sub-calls no free slot takes); start one worker per queue")
    elif not queues <= set(QUEUES):
        problems.append(f"unknown queue(s) {sorted(queues - set(QUEUES))}; use rlm or llm")
    if not problems and RLM_QUEUE in queues:
        problems.extend(_local_sandbox_problems(settings))
    if problems:
        print("rlmq worker: " + " | ".join(problems), file=sys.stderr, flush=True)
        raise SystemExit(2)
    make_non_dumpable()  # before the pool forks: the keys in this process's environment stay its own
    WORKER_QUEUES.update(queues)
    if RLM_QUEUE in queues and conf is not None:
        # Reserve a run only when a slot is free to start it: a run acked early leaves its slot's
        # prefetch credit free, and the next run would wait behind it (or die with the worker).
        conf.worker_disable_prefetch = True
    if LLM_QUEUE in queues:  # pay LiteLLM's ~6 s import and pool setup now, not in the first sub-task
        from workers.llm_call import preload

        preload()


@signals.worker_process_init.connect
def _protect_pool_child(**_: Any) -> None:
    """Prefork children inherit the flag through fork; set it again in case they were exec'd."""
    make_non_dumpable()


def _local_sandbox_problems(settings: Settings) -> list[str]:
    """An rlm worker that may run local sandboxes checks it can isolate them (bubblewrap and user
    namespaces), or says loudly that the operator chose plain processes."""
    local = SandboxBackend.LOCAL
    if settings.sandbox is not local and local not in settings.allowed_sandboxes:
        return []
    if settings.local_isolation == "process":
        # celeryd_init runs before Celery sets up logging: stderr is the worker's log here
        print("rlmq worker: warning: RLMQ_LOCAL_ISOLATION=process: local sandboxes are plain processes, "
              "NOT a security boundary; every run's record says so", file=sys.stderr, flush=True)
        return []
    from broker_bridge.backends.local import local_isolation_problem

    problem = local_isolation_problem(settings.local_isolation.value)
    return [f"local sandboxes cannot be isolated here: {problem}"] if problem else []


def _queue_names(raw: Any) -> set[str]:
    if not raw:
        return set()
    items = raw.split(",") if isinstance(raw, str) else [q for part in raw for q in str(part).split(",")]
    return {q.strip() for q in items if q.strip()}
