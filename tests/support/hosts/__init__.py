"""Hosts for multi-host tests: network namespaces on one switch (``network``), what they leave
behind (``janitor``), latency without netem (``delayer``), Redis with Sentinel across them
(``sentinel``), pytest fixtures (``fixtures``).

The names below are loaded on first use, so that ``python -m tests.support.hosts.janitor`` and
``.delayer`` (small processes the harness starts) do not import the harness itself.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Host", "HostProcess", "Network", "latency_backend", "latency_missing", "unavailable"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tests.support.hosts import network

        return getattr(network, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
