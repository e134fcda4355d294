"""What every Celery process of rlmq agrees on: queue and task names, and the app's configuration.

The workers' app (``tasks.app``) and the client's (``client_app``) are built from the same
``CELERY_CONFIG``, so a client that only *sends* tasks by name routes and serializes them exactly
as the workers expect, without importing the worker runtime (dspy, litellm, the run engine).

Queues:

- ``rlm``: one ``run_rlm`` per RLM run. Early ack, and no prefetch (``worker_disable_prefetch``,
  set at worker start): Redis redelivers any unacked message older than ``visibility_timeout``
  even to a live worker, so a long ``acks_late`` run would execute again and again; runs are
  protected by their own claim (renewed every second) instead, and a run whose worker died is
  restarted by the recovery sweep every rlm worker runs (``workers.recovery``). Run with
  ``-P threads -c 32`` (the engine enforces time limits itself; prefork works too), events on.
- ``llm``: many short ``llm_batch`` sub-tasks. ``acks_late`` + ``reject_on_worker_lost`` (prefork
  only); a dead worker's sub-tasks are sent again by the gathering run as soon as the worker's
  heartbeat expires (``workers.liveness``); safe because answers go through the response cache
  (single-flight). Run with ``-P threads -c 32``. ``llm_batch`` sends task events unless
  ``RLMQ_SUBTASK_EVENTS=off`` (Flower then counts each llm worker's work; measured cost in
  docs/ARCHITECTURE.md), with a repr that names its run and never shows its prompts.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CELERY_APP", "CELERY_CONFIG", "LLM_QUEUE", "LLM_TASK", "QUEUES", "REAP_INTERVAL_SECONDS", "REAP_TASK",
    "RLM_QUEUE", "RUN_TASK", "client_app", "point_at",
]

CELERY_APP = "tasks"  # the module `celery -A` loads in workers, beat and Flower
RLM_QUEUE = "rlm"
LLM_QUEUE = "llm"
QUEUES = (RLM_QUEUE, LLM_QUEUE)
RUN_TASK = "rlmq.run_rlm"
LLM_TASK = "rlmq.llm_batch"
REAP_TASK = "rlmq.reap_leases"
REAP_INTERVAL_SECONDS = 60.0
# Longer than any sub-task (its own deadline is far below), so only a dead worker's
# sub-tasks come back; runs are acked early and never wait this long in a prefetch buffer.
VISIBILITY_TIMEOUT_SECONDS = 3600
# Sending a task, storing a result and a run's gather (the result backend's pub/sub reconnect) wait out
# a Redis restart: about two minutes, as the workers' own Redis client does (workers.context).
OUTAGE_RETRY_POLICY = {"max_retries": 60, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}

# A Redis host that vanishes (powered off, cut off, failed over) closes no TCP connection: without a socket
# timeout a publish on it waits forever, which froze the whole event loop of every worker when the primary's
# host was lost (tests/test_hosts_faults.py). Nothing kombu sends blocks that long on a live server (its BRPOP
# returns within 1 s); its checks of the idle BRPOP and pub/sub connections run every health check interval.
SOCKET_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 5.0
HEALTH_CHECK_SECONDS = 5
BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {
    "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS, "socket_timeout": SOCKET_TIMEOUT_SECONDS,
    "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS, "health_check_interval": HEALTH_CHECK_SECONDS,
}
RESULT_BACKEND_TRANSPORT_OPTIONS: dict[str, Any] = {
    "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS, "retry_policy": OUTAGE_RETRY_POLICY,
}

CELERY_CONFIG: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "event_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "task_default_queue": RLM_QUEUE,
    "task_create_missing_queues": False,
    "task_routes": {RUN_TASK: {"queue": RLM_QUEUE}, LLM_TASK: {"queue": LLM_QUEUE}, REAP_TASK: {"queue": LLM_QUEUE}},
    "worker_prefetch_multiplier": 1,
    "task_acks_late": False,  # the default; llm_batch opts in on its decorator
    "worker_send_task_events": True,  # runs, and llm_batch unless RLMQ_SUBTASK_EVENTS=off
    "task_send_sent_event": False,
    "task_track_started": True,
    # result_expires is RLMQ_RESULT_EXPIRES, a worker setting: tasks.app sets it (the client stores no results)
    "broker_transport_options": BROKER_TRANSPORT_OPTIONS,
    "result_backend_transport_options": RESULT_BACKEND_TRANSPORT_OPTIONS,
    # the result backend's own connections (Celery's default socket timeout is 120 s)
    "redis_socket_timeout": SOCKET_TIMEOUT_SECONDS,
    "redis_socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
    "redis_backend_health_check_interval": HEALTH_CHECK_SECONDS,
    "broker_connection_retry_on_startup": True,
    "broker_connection_max_retries": None,  # a worker waits for Redis to come back, however long
    # A Redis restart must not lose a result or a sent task: storing and publishing wait it out.
    "result_backend_always_retry": True,
    "result_backend_max_sleep_between_retries_ms": 2000,
    "task_publish_retry_policy": OUTAGE_RETRY_POLICY,
    "worker_cancel_long_running_tasks_on_connection_loss": False,
    "beat_schedule": {
        "reap-expired-sandbox-leases": {"task": REAP_TASK, "schedule": REAP_INTERVAL_SECONDS,
                                         "options": {"expires": REAP_INTERVAL_SECONDS}},
    },
}


def point_at(app: Any, redis_url: str) -> None:
    """Use ``redis_url`` as the app's broker and result backend; call before the app is first used."""
    from rlmq.redis_url import celery_settings

    app.conf.update(celery_settings(redis_url))


def client_app(redis_url: str) -> Any:
    """A Celery app that sends rlmq's tasks by name and reads their states (never runs them)."""
    from celery import Celery
    from kombu import Queue

    app = Celery("rlmq-client", set_as_current=False)
    # kombu ships type information but leaves Queue.__init__ unannotated
    queues = tuple(Queue(q) for q in QUEUES)  # type: ignore[no-untyped-call]
    app.conf.update(CELERY_CONFIG, task_queues=queues)
    point_at(app, redis_url)
    return app
