"""A Daytona-compatible server for development and CI: the unmodified ``daytona`` SDK (0.226) drives it
through ``DAYTONA_API_URL`` and ``DAYTONA_API_KEY``, and each sandbox it creates is a real isolated
sandbox on this machine (bubblewrap namespaces, its own loopback, no host files, no network).

Start it with ``python -m tests.support.daytona_emulator --port 0``: the first line on stdout is the
API URL. Tests use ``tests.support.daytona_emulator.harness``. It lives under ``tests/``: nothing a
worker imports may depend on it.

Modules: ``server`` (REST API, socket.io events, admin), ``sandboxes`` (records, lifecycle, bwrap),
``toolbox`` (the daemon's API), ``preview`` (preview links), ``faults`` (knobs), ``errors`` (Daytona's
error bodies), ``agent_link`` (the host side of an agent's socket), ``janitor`` (ends the sandboxes of an
emulator that died); ``agent`` and ``repl_worker`` run inside the sandboxes (stdlib only).
"""
