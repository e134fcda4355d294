"""The connection rlmq's Sentinel clients use: redis-py's, except that a dropped connection asks the
Sentinels for the primary again when a command reconnects it.

redis-py (8.1) reconnects a dropped connection from ``send_packed_command`` with
``connect_check_health``, which retries the address it had with the connection's retry policy, not
``SentinelManagedConnection.connect`` (which asks the Sentinels before each try). With rlmq's
outage policy (``workers.context.OUTAGE_RETRY``, about two minutes) a command that lost its
connection to a primary whose host is gone kept dialling that host for minutes after the Sentinels had
promoted the replica: a run's claim renewal stalled until the run was restarted elsewhere
(tests/test_hosts_faults.py, the primary's host powered off), and a command in flight when a primary
was SIGKILLed dialled the dead port as long (a run stalled two minutes after a loopback failover).
Upstream: redis/redis-py#3874 (open, fix proposed in #3875); drop this once a release has it.
"""

from __future__ import annotations

from typing import Any

from redis.connection import SSLConnection
from redis.sentinel import SentinelManagedConnection

__all__ = ["FailoverConnection", "FailoverSSLConnection"]


class FailoverConnection(SentinelManagedConnection):
    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> Any:
        if self._sock or not retry_socket_connect:  # connect_to's own call: one try at the address it was given
            return super().connect_check_health(check_health=check_health, retry_socket_connect=False)
        return self.connect()  # type: ignore[no-untyped-call]  # each try asks the Sentinels for the primary


class FailoverSSLConnection(FailoverConnection, SSLConnection):
    pass
