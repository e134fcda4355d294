"""Faults across hosts (issue #19, item 3), on the layout of ``tests.support.hosts.fleet``: a Redis
primary and a Sentinel on a, a replica, a Sentinel and one rlm and one llm worker on b, a Sentinel and
one rlm and one llm worker on c, the client (this test) and the stub LLM on d. Every worker reaches
Redis through the Sentinels (``REDIS_URL=sentinel://…``) and runs with the fault tests' short leases.

Real parts throughout: redis-server and Sentinels, ``celery worker`` processes on their hosts, local
sandboxes, the stub over HTTP across the switch. Each test prints ``MEASURED`` lines (``-s``) that
docs/reliability.md quotes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from broker_bridge.backends.process_jail import pids_with_marker
from rlmq.store.records import RunRecord, RunStatus, RunStore
from tests.support.hosts import Network
from tests.support.hosts.fixtures import require_latency
from tests.support.hosts.fleet import HostsFleet, hosts_fleet
from tests.support.records import stored_record, stored_result
from tests.support.reliability import batch_step, prompt_repeats, sub_answer, sub_requests, submit
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(hosts_harness: None) -> Iterator[HostsFleet]:
    """The layout, for the module's tests (each undoes its fault), with this test's own sockets on host d."""
    with Network() as network, hosts_fleet(network) as started, started.d.entered():
        yield started


@pytest.fixture(autouse=True)
def whole_layout(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every host linked, no latency, both rlm workers taking runs, the stub answering at once, before
    each test that uses the module's fleet, whatever the one before it left."""
    if "fleet" in request.fixturenames:
        fleet: HostsFleet = request.getfixturevalue("fleet")
        fleet.network.clear_latency()
        fleet.network.heal_all()
        fleet.stub.latency = 0.0
        fleet.stub.reset_stats()  # prompts paid twice are counted per test
        control = fleet.control()
        for name in ("rlm-b", "rlm-c"):
            control.control.add_consumer("rlm", destination=[fleet.node(name)], reply=True, timeout=5)
        control.close()
    yield


@pytest.fixture
def r(fleet: HostsFleet) -> Iterator[redis.Redis]:
    client = fleet.client()
    yield client
    client.close()


def record_or_none(r: redis.Redis, run_id: str) -> RunRecord | None:
    try:
        return RunStore(r).get(run_id)
    except redis.RedisError:  # Redis away for a moment (a cut, a failover)
        return None


def test_a_host_cut_off_mid_run_loses_the_run_to_another_host_and_writes_nothing(fleet: HostsFleet, r) -> None:
    """(a) host c, owning a run, loses its network: the run resumes on b and succeeds; when c comes
    back its stale attempt writes nothing (fenced) and its sandbox is gone."""
    control = fleet.control()
    rlm_b = fleet.node("rlm-b")
    control.control.cancel_consumer("rlm", destination=[rlm_b], reply=True, timeout=5)  # so that c takes the run
    run_id, _ = submit(r, fleet.stub, ["print(items)", batch_step(6, then="import time\ntime.sleep(3)"),
                                       "SUBMIT(answers=answers)"], tag="cut", url=fleet.url())

    def owned_by_c_in_step_2() -> RunRecord | None:
        record = record_or_none(r, run_id)
        # the batch gathered (its answers cached): nothing of it is in flight when c goes
        return record if (record and record.status is RunStatus.RUNNING and record.progress.iteration == 2
                          and record.progress.batch is None and record.progress.usage.sub.calls == 6) else None

    owned = wait_until(owned_by_c_in_step_2, 60, "the run on c, its batch answered")
    assert owned.worker == fleet.node("rlm-c") and owned.progress.sandbox is not None
    sandbox = owned.progress.sandbox.id
    assert pids_with_marker(sandbox), "c's sandbox runs"
    control.control.add_consumer("rlm", destination=[rlm_b], reply=True, timeout=5)
    control.close()

    cut_at = time.monotonic()
    fleet.network.cut(fleet.c)
    try:
        done = fleet.wait_finished(r, run_id, timeout=60)
        recovered = time.monotonic() - cut_at
    finally:
        fleet.network.restore(fleet.c)
    restored_at = time.monotonic()
    assert done.status is RunStatus.SUCCEEDED, (done.status, done.error)
    assert done.attempt == 2 and done.worker == fleet.node("rlm-b"), (done.attempt, done.worker)
    result = stored_result(r, run_id)
    assert result["outputs"]["answers"] == [sub_answer(f"question {i}") for i in range(6)]

    rlm_c = fleet.workers["rlm-c"]
    wait_until(lambda: "lost its claim" in rlm_c.log_tail(300), 60, "c's attempt noticed it was fenced off")
    wait_until(lambda: not pids_with_marker(sandbox), 30, "c's sandbox gone")
    reaped = time.monotonic() - restored_at
    time.sleep(2.0)  # anything c would still write, it writes now
    after = stored_record(r, run_id)
    assert (after.status, after.attempt, after.worker, after.finished_at) == (
        done.status, done.attempt, done.worker, done.finished_at)
    assert RunStore(r).result(run_id) == result
    assert prompt_repeats(fleet.stub) == {}, "a prompt paid twice"
    assert rlm_c.alive, "c's worker carries on"
    print(f"MEASURED host cut: run succeeded on b {recovered:.1f} s after c's cut; c fenced and its sandbox "
          f"gone {reaped:.1f} s after c came back")


def test_an_llm_workers_host_partitioned_from_redis_mid_fan_out_loses_nothing(fleet: HostsFleet, r) -> None:
    """(b) host c loses Redis's host (a) mid-fan-out, while it still reaches the LLM: its sub-tasks are
    sent again to b, every prompt is answered once and in order; paid twice at most are the prompts
    c's llm worker had in flight (a sub-task's prompts are asked at once), as for a dead llm worker."""
    control = fleet.control()
    control.control.cancel_consumer("rlm", destination=[fleet.node("rlm-c")], reply=True, timeout=5)  # the run on b
    control.close()
    fleet.stub.latency = 1.0
    n = 48
    run_id, _ = submit(r, fleet.stub, ["print(items)", batch_step(n), "SUBMIT(answers=answers)"], tag="partition",
                       url=fleet.url())

    wait_until(lambda: sub_requests(fleet.stub) >= 8, 60, "the batch's first prompts at the LLM")
    cut_at = time.monotonic()
    fleet.network.partition(fleet.c, fleet.a)
    try:
        done = fleet.wait_finished(r, run_id, timeout=60)
        recovered = time.monotonic() - cut_at
    finally:
        fleet.network.heal(fleet.c, fleet.a)
    assert done.status is RunStatus.SUCCEEDED, (done.status, done.error)
    assert done.worker == fleet.node("rlm-b") and done.attempt == 1
    assert stored_result(r, run_id)["outputs"]["answers"] == [sub_answer(f"question {i}") for i in range(n)]
    assert done.progress.subtasks_resent >= 1, done.progress
    repeats = prompt_repeats(fleet.stub)
    assert all(count == 2 for count in repeats.values()), repeats
    first_asked: dict[str, float] = {}
    for req in fleet.stub.requests:
        first_asked.setdefault(req.prompt[:80], req.at)
    # in flight on c when it was cut off: c cannot take a lock or a limiter slot without Redis
    late = {p: round(first_asked[p] - cut_at, 2) for p in repeats if first_asked[p] > cut_at + 0.5}
    assert not late, late
    print(f"MEASURED llm host partitioned from Redis: run succeeded {recovered:.1f} s after the partition; "
          f"{done.progress.subtasks_resent} sub-tasks resent, {len(repeats)} prompts paid twice")


def test_a_run_fans_out_across_hosts_with_20_ms_between_them(fleet: HostsFleet, r) -> None:
    """(d) 20 ms ± 5 ms on every packet between hosts (Redis round trips of ~40 ms): a fan-out still
    succeeds with every answer in order and nothing paid twice. Its throughput against loopback is
    ``python bench/hosts_network.py --fanout 500``'s to measure, not a test's."""
    require_latency()
    fleet.network.set_latency(20, 5)
    n = 32
    run_id, _ = submit(r, fleet.stub, ["print(items)", batch_step(n), "SUBMIT(answers=answers)"], tag="latency",
                       url=fleet.url())
    done = fleet.wait_finished(r, run_id, timeout=120)
    fleet.network.clear_latency()
    assert done.status is RunStatus.SUCCEEDED and done.attempt == 1, (done.status, done.error, done.restarts)
    assert stored_result(r, run_id)["outputs"]["answers"] == [sub_answer(f"question {i}") for i in range(n)]
    assert prompt_repeats(fleet.stub) == {}
