"""Losing Redis across hosts (issue #19, item 3 (e)), on the layout of ``tests.support.hosts.fleet``: a
submit while no primary can be had. The test has a layout of its own (it loses hosts a and b for good),
in a module apart from ``tests/test_hosts_faults.py`` so that the two layouts never run at once.

Not here yet: (c), the primary's host powered off mid-fan-out: it passes in about half the runs
(docs/reliability.md, "Faults across hosts").
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.cli import RLMQ, cli_env
from tests.support.hosts import Network
from tests.support.hosts.fleet import hosts_fleet

pytestmark = pytest.mark.slow


def test_a_submit_while_redis_has_no_primary_fails_in_one_line(network: Network, tmp_path: Path) -> None:
    """(e) the primary's and the replica's hosts are gone (c's Sentinel still answers, naming the lost
    primary; no failover is possible): `rlmq submit` on d exits 3 with one line naming no password.
    (With every Sentinel's host gone too it is the same line, after 22 s: measured, not run here.)"""
    lost = ("a", "b")
    with hosts_fleet(network, workers=False) as fleet:
        for name in lost:
            network.power_off(name)
        started = time.monotonic()
        done = fleet.d.run([*RLMQ, "submit", "--signature", "question -> answer", "--input", "question=hi"],
                           env=cli_env(tmp_path, REDIS_URL=fleet.url()), cwd=str(tmp_path), timeout=120, check=False)
        took = time.monotonic() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
    assert len(lines) == 1 and "cannot reach Redis" in lines[0] and len(lines[0]) < 400, done.stderr
    assert fleet.redis_group.password not in done.stderr and fleet.redis_group.sentinel_password not in done.stderr
    assert done.stdout == ""
    print(f"MEASURED submit without a primary ({', '.join(lost)} lost): exit 3 after {took:.1f} s: {lines[0]}")

