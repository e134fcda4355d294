"""The Celery app of the workers: ``rlmq.celery_config`` plus what a worker does at start.

At ``celeryd_init`` a worker, in order: refuses to start with a one-line error when its settings are
bad, a Redis off this machine has no password, or its queues could deadlock (a worker serving both
``rlm`` and ``llm`` can have every run slot waiting on sub-tasks no free slot takes); points Celery at
the settings' Redis; makes itself non-dumpable (``workers.hardening``); keeps its consumer alive across
a Redis restart (``workers.broker_close``); and, per queue, turns off prefetch (rlm) or preloads the LM
client (llm).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import Celery, signals
from kombu import Queue

from rlmq.celery_config import CELERY_CONFIG, LLM_QUEUE, QUEUES, RLM_QUEUE, point_at
from rlmq.redis_url import celery_settings, unauthenticated_redis_problem
from rlmq.settings import LogFormat, SandboxBackend, Settings, SettingsError, redis_url_from_env
from workers.broker_close import tolerate_detached_channels
from workers.context import setting_at_import, worker_settings
from workers.hardening import make_non_dumpable
from workers.log_format import install_json_logs

__all__ = ["WORKER_QUEUES", "app"]

WORKER_QUEUES: set[str] = set()  # the queues this process consumes, when it is a worker

app = Celery("rlmq")
# RLMQ_RESULT_EXPIRES: how long Celery's result backend keeps task states (run records follow it too).
app.conf.update(CELERY_CONFIG, task_queues=tuple(Queue(q) for q in QUEUES),
                result_expires=setting_at_import("result_expires"))

_url = redis_url_from_env()
if _url:
    point_at(app, _url)


@signals.celeryd_init.connect
def _worker_start(sender: Any = None, conf: Any = None, options: dict[str, Any] | None = None, **_: Any) -> None:
    queues = _queue_names((options or {}).get("queues"))
    settings = _refuse_a_bad_start(queues)
    _use_the_settings_redis(conf, settings)
    make_non_dumpable()  # before the pool forks: the keys in this process's environment stay its own
    tolerate_detached_channels()  # a Redis restart under a running sub-task must not end the worker
    WORKER_QUEUES.update(queues)
    if RLM_QUEUE in queues:
        _reserve_runs_only_when_free(conf)
    if LLM_QUEUE in queues:
        _preload_lm_client()
        _bound_prompt_threads(options or {})


def _refuse_a_bad_start(queues: set[str]) -> Settings:
    """The worker's settings, or exit 2 with every problem on one line (bad settings, an unprotected
    remote Redis, a queue mix that can deadlock, local sandboxes that cannot be isolated)."""
    problems: list[str] = []
    settings: Settings | None = None
    try:
        settings = worker_settings()
        insecure = unauthenticated_redis_problem(settings.redis_url)
        if insecure:
            problems.append(insecure)
    except SettingsError as exc:
        problems.append(str(exc))
    if not queues:
        problems.append("pass -Q rlm (runs) or -Q llm (sub-LLM calls): a worker serving both can deadlock")
    elif {RLM_QUEUE, LLM_QUEUE} <= queues:
        problems.append("a worker must not consume both 'rlm' and 'llm' (every run slot could wait on "
                        "sub-calls no free slot takes); start one worker per queue")
    elif not queues <= set(QUEUES):
        problems.append(f"unknown queue(s) {sorted(queues - set(QUEUES))}; use rlm or llm")
    if settings is not None and not problems and RLM_QUEUE in queues:
        problems.extend(_local_sandbox_problems(settings))
    if problems or settings is None:
        print("rlmq worker: " + " | ".join(problems), file=sys.stderr, flush=True)
        raise SystemExit(2)
    return settings


def _use_the_settings_redis(conf: Any, settings: Settings) -> None:
    """The broker and result backend are the settings' Redis (``.env`` included, not only the environment)."""
    if conf is not None:
        conf.update(celery_settings(settings.redis_url))


def _reserve_runs_only_when_free(conf: Any) -> None:
    """Reserve a run only when a slot is free to start it: a run acked early leaves its slot's prefetch
    credit free, and the next run would wait behind it (or die with the worker)."""
    if conf is not None:
        conf.worker_disable_prefetch = True


def _bound_prompt_threads(options: dict[str, Any]) -> None:
    """A threads-pool llm worker answers at most ``-c`` prompts at once (``workers.batch_answer``);
    a prefork child answers its one sub-task's prompts at once, up to RLMQ_MAX_IN_FLIGHT."""
    from workers.batch_answer import use_prompt_threads

    pool = str(options.get("pool") or options.get("pool_cls") or "")
    if "thread" in pool.lower():
        use_prompt_threads(int(options.get("concurrency") or os.cpu_count() or 1))


def _preload_lm_client() -> None:
    """Pay LiteLLM's ~6 s import and pool setup at start, not in the first sub-task."""
    from workers.llm_call import preload

    preload()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger: Any = None, **_: Any) -> None:
    """RLMQ_LOG_FORMAT=json: Celery's handlers write one JSON object per line (workers.log_format)."""
    if logger is not None and setting_at_import("log_format") is LogFormat.JSON:
        install_json_logs(logger)


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
