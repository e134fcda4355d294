"""``python -m tests.support.daytona_emulator --port 0``: prints the API URL as the first line of stdout,
then serves until SIGTERM/SIGINT (every sandbox dies with it)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.daytona_emulator",
                                     description="A Daytona-compatible API whose sandboxes are local bubblewraps")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY[:ORG]",
                        help="an accepted API key (repeat for more organizations); default: one random key, "
                             "printed on stderr")
    parser.add_argument("--state-dir", help="where sandbox homes and sockets live (default: a temporary directory)")
    parser.add_argument("--minute", type=float, default=60.0,
                        help="seconds per Daytona minute, for auto-stop/auto-delete/TTL (tests shrink it)")
    parser.add_argument("--cpu-quota", type=int, default=0, help="vCPUs an organization may run at once (0: no limit)")
    parser.add_argument("--create-delay", type=float, default=0.0, help="seconds a sandbox stays 'creating'")
    parser.add_argument("--faults", default="", help="initial faults as JSON (see faults.py)")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop (and take every sandbox down) when the process that started this one is gone")
    args = parser.parse_args(argv)

    keys: dict[str, str] = {}
    for item in args.api_key or [secrets.token_urlsafe(24)]:
        key, _, org = item.partition(":")
        keys[key] = org or f"org-{len(keys) + 1}"
    if not args.api_key:
        print(f"daytona emulator: API key {next(iter(keys))}", file=sys.stderr, flush=True)
    _non_dumpable()  # sandbox code must not read this process's memory or environment
    state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="daytona-emulator-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(_serve(args, keys, state_dir))
    finally:
        if not args.state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
    return 0


async def _serve(args: argparse.Namespace, keys: dict[str, str], state_dir: Path) -> None:
    from tests.support.daytona_emulator.server import Emulator, serve

    sock = socket.create_server((args.host, args.port))
    host, port = sock.getsockname()[:2]
    base_url = f"http://{host}:{port}"
    emulator = Emulator(state_dir, base_url, keys, minute=args.minute, cpu_quota=args.cpu_quota,
                        create_delay=args.create_delay, faults=json.loads(args.faults) if args.faults else None,
                        owns_state_dir=not args.state_dir)
    runner = await serve(emulator, sock)
    print(f"{base_url}/api", flush=True)  # the first line of stdout: what DAYTONA_API_URL should be
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # held while the emulator serves: the loop keeps only a weak reference to a task
    watcher = asyncio.ensure_future(_watch_parent(os.getppid(), stop)) if args.exit_with_parent else None
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    await runner.cleanup()


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    while os.getppid() == parent:  # a killed test run must not leave the emulator and its sandboxes behind
        await asyncio.sleep(0.5)
    stop.set()


def _non_dumpable() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
