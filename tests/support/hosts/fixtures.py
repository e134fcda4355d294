"""pytest fixtures for the multi-host harness, loaded by tests/conftest.py as a plugin.

``network`` is a fresh, empty ``Network`` per test, closed (processes killed, namespaces deleted)
however the test ends; the whole module skips, saying why, where hosts cannot be made (not
Linux, not root, no iproute2, ``ip netns add`` refused). ``require_latency()`` skips one test that
needs delay or loss where neither netem nor the NFQUEUE delayer can be had.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.hosts import janitor
from tests.support.hosts.network import Network, latency_missing, unavailable

__all__ = ["hosts_harness", "network", "require_latency"]


@pytest.fixture(scope="session")
def hosts_harness() -> None:
    """Skip where hosts cannot be made; else first remove what killed sessions left behind."""
    why = unavailable()
    if why:
        pytest.skip(why)
    janitor.sweep()


@pytest.fixture
def network(hosts_harness: None) -> Iterator[Network]:
    with Network() as net:
        yield net


def require_latency() -> None:
    why = latency_missing()
    if why:
        pytest.skip(why)
