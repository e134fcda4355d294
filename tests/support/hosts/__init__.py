"""Hosts for multi-host tests: network namespaces on one switch (``network``), what they leave
behind (``janitor``), latency without netem (``delayer``), Redis with Sentinel across them (``sentinel``), pytest fixtures (``fixtures``)."""

from tests.support.hosts.network import Host, HostProcess, Network, latency_backend, latency_missing, unavailable

__all__ = ["Host", "HostProcess", "Network", "latency_backend", "latency_missing", "unavailable"]
