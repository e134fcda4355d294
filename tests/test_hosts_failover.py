"""Issue #19 (c): the Redis primary's host powered off mid-fan-out.

Not in CI's run yet: it passed 2 of 4 runs before lost sub-task messages were resent
(``workers.liveness.missing_subtasks``) and 3 of 3 after; one failing run ended FAILED with an
``AdapterParseError`` (a root step answered as a sub-call) that is not understood. Run it with
``RLMQ_TEST_HOST_FAILOVER=1 pytest tests/test_hosts_failover.py -s`` (root, as the other host tests).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from rlmq.store.records import RunStatus
from tests.support.hosts import Network
from tests.support.hosts.fleet import HostsFleet, hosts_fleet
from tests.support.records import stored_result
from tests.support.reliability import batch_step, prompt_repeats, sub_answer, sub_requests, submit
from tests.support.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("RLMQ_TEST_HOST_FAILOVER"), reason=(
    "the primary's host lost mid-fan-out is not reliable yet (see this module's docstring); "
    "RLMQ_TEST_HOST_FAILOVER=1 runs it"))]


# Leases longer than a failover's stalls: a connection to the lost primary blocks its caller for the socket
# timeout (10-15 s) before it asks the Sentinels again, so the 3-s test lease would lapse under an owner
# that is alive. The default lease (30 s) is longer still.
FAILOVER_LEASE_ENV = {"RLMQ_LEASE_TTL": "20"}


@pytest.fixture
def failover_fleet(network: Network) -> Iterator[HostsFleet]:
    """A layout of its own (the test loses host a for good), with leases longer than a failover."""
    with hosts_fleet(network, env=FAILOVER_LEASE_ENV) as started, started.d.entered():
        yield started


def test_the_redis_primarys_host_lost_mid_fan_out_fails_over_and_the_run_finishes(failover_fleet: HostsFleet) -> None:
    """(c) host a (the Redis primary) powered off while a batch fans out: the Sentinels promote b's
    replica, every worker and the client follow it, the run succeeds, no answered prompt is paid again."""
    fleet = failover_fleet
    r = fleet.client()
    fleet.stub.latency = 0.5
    n = 64
    run_id, _ = submit(r, fleet.stub, ["print(items)", batch_step(n), "SUBMIT(answers=answers)"], tag="primary",
                       url=fleet.url())
    wait_until(lambda: sub_requests(fleet.stub) >= 8, 60, "the batch under way")
    lost_at = time.monotonic()
    fleet.network.power_off(fleet.a)
    fleet.redis_group.wait_failover(via=fleet.d, away_from=fleet.a)
    failed_over = time.monotonic() - lost_at
    done = fleet.wait_finished(r, run_id, timeout=90)
    recovered = time.monotonic() - lost_at
    assert done.status is RunStatus.SUCCEEDED, (done.status, done.error)
    assert stored_result(r, run_id)["outputs"]["answers"] == [sub_answer(f"question {i}") for i in range(n)]
    assert prompt_repeats(fleet.stub) == {}, "an answered prompt paid again"
    assert all(proc.alive for proc in fleet.workers.values()), fleet.logs()
    print(f"MEASURED primary lost: Sentinels named b {failed_over:.1f} s after a's power-off; run succeeded "
          f"{recovered:.1f} s after (attempt {done.attempt}, {done.progress.subtasks_resent} sub-tasks resent)")
