"""A worker that loses Redis while it runs a sub-task reconnects instead of exiting.

After a lost broker connection, Celery 5.7 (``Consumer.on_connection_error_after_connected``) closes the
consumer's connection twice: ``collect()``, which also detaches kombu's transport from it
(``transport.client = None``), then ``close()``. When Redis went away under the channel's pending
BRPOP, the first close of the channel fails reading that BRPOP before the channel counts as closed, so
the second close runs in full: it restores the channel's unacked messages (an ``llm_batch`` running
under ``acks_late``) through a new Redis client whose parameters kombu reads from the detached
transport, and raises ``AttributeError: 'NoneType' object has no attribute 'hostname'``. That is no
connection error, so Celery's cleanup lets it through: "Unrecoverable error", and the worker exits
once its running sub-tasks end. An llm worker with a free slot (so a BRPOP pending) and a sub-task
running when Redis stopped exited so; with no other llm worker, every run then waited on sub-tasks
nobody took (tests/test_jobs.py's Redis restart, tests/test_reliability_redis.py).

:func:`tolerate_detached_channels` makes kombu report what happened, a closed connection, as the
connection error its callers already ignore there (as when Redis itself refuses the restore): the
messages stay in kombu's unacked set, the running sub-task still ends and stores its answer (its ack
is logged as failed), and the consumer reconnects when Redis is back.
"""

from __future__ import annotations

from typing import Any

import redis

__all__ = ["tolerate_detached_channels"]

_installed: list[bool] = []


def tolerate_detached_channels() -> None:
    """A kombu Redis channel (Sentinel's too) whose transport was detached raises ``redis.ConnectionError``
    when it needs a new client, instead of an ``AttributeError``. Idempotent."""
    if _installed:
        return
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel._connparams

    def connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection was already closed")
        return original(self, asynchronous)

    setattr(kombu_redis.Channel, "_connparams", connparams)  # noqa: B010 - a method replaced on the class
    _installed.append(True)
