"""The ``rlmq`` subcommands that show runs and the fleet: ``trace``, ``ui``, ``workers``, ``stats``, ``exporter``;
the budget flags of ``submit``; and the outputs ``submit --wait`` prints.

``rlmq.cli`` wires these in with one call each (``add_view_commands``, ``add_budget_flags``,
``budget_options``, ``print_outputs``), so the command's main module stays small.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlmq.client import Client

__all__ = ["add_budget_flags", "add_view_commands", "budget_options", "print_outputs"]


def _client(args: argparse.Namespace) -> Client:
    # Not rlmq.cli's: under `python -m rlmq.cli` that module is __main__, and importing it again
    # would make a second copy whose exception classes main() does not catch.
    from rlmq.client import Client

    return Client(getattr(args, "redis_url", None))


def _number(kind: type, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value > 0 or value > 1e12:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r} must be {what} above 0")
        return value

    return parse


def add_budget_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-cost", type=_number(float, "a number of dollars"), metavar="DOLLARS",
                   help="stop the run before it pays for a call that would take it past this many dollars "
                        "(LiteLLM's prices; the run's models must be priced)")
    p.add_argument("--max-tokens", type=_number(int, "a whole number of tokens"), metavar="TOKENS",
                   help="stop the run before it pays for more tokens (input + output, root and sub-calls)")
    p.add_argument("--time-limit", type=_number(float, "a number of seconds"), metavar="SECONDS",
                   help="stop the run after this much wall-clock time")
    levels = _number(int, "a whole number of levels")
    p.add_argument("--max-depth", type=levels, metavar="LEVELS",
                   help="levels of runs: above 1, sandbox code may start child runs with rlm_query (default 1: none); "
                        "the budgets above are then the whole tree's")
    p.add_argument("--max-children", type=_number(int, "a whole number of runs"), metavar="RUNS",
                   help="child runs the whole tree may start")
    p.add_argument("--max-sandboxes", type=_number(int, "a whole number of sandboxes"), metavar="SANDBOXES",
                   help="sandboxes the tree may hold at once (at least --max-depth)")


def budget_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_cost": args.max_cost, "max_tokens": args.max_tokens, "time_limit": args.time_limit,
            "max_depth": args.max_depth, "max_children": args.max_children, "max_sandboxes": args.max_sandboxes}


def print_outputs(client: Client, run_id: str) -> None:
    """A succeeded run's outputs as JSON on stdout (progress went to stderr)."""
    result = client.result(run_id)
    print(json.dumps(result.get("outputs"), indent=2, ensure_ascii=False))
    sys.stdout.flush()


def cmd_trace(args: argparse.Namespace) -> int:
    from rlmq.trace import format_trace

    client = _client(args)
    record = client.status(args.run)
    steps = client.trace(args.run)
    if args.jsonl:
        for step in steps:
            print(json.dumps(step, ensure_ascii=False))
    elif args.json:
        print(json.dumps({"run_id": args.run, "status": record.status.value, "error": record.error,
                          "signature": record.spec.signature, "usage": record.progress.usage.to_json_dict(),
                          "steps": steps}, indent=2, ensure_ascii=False))
    else:
        from rlmq.tree import format_tree_trace

        color = {"always": True, "never": False}.get(args.color, sys.stdout.isatty())
        tree = client.tree(args.run, depth=args.depth)
        print(format_tree_trace(tree, lambda run_id: steps if run_id == args.run else client.trace(run_id),
                                lambda rec, its_steps: format_trace(rec, its_steps, color=color)))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import os

    from rlmq.client import ClientError
    from rlmq.ui import create_app, serve

    auth = args.basic_auth or os.environ.get("FLOWER_BASIC_AUTH") or None
    if args.address not in ("127.0.0.1", "localhost", "::1") and not auth:
        raise ClientError(f"refusing to serve run pages on {args.address} without --basic-auth or FLOWER_BASIC_AUTH "
                       "(they show inputs' excerpts and outputs)")
    app = create_app(_client(args), basic_auth=auth)
    print(f"rlmq ui: http://{args.address}:{args.port}/  (Ctrl-C stops it)", file=sys.stderr, flush=True)
    serve(app, args.address, args.port)
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    from rlmq.fleet import format_workers, workers_view

    workers = workers_view(_client(args), timeout=args.timeout)
    print(json.dumps(workers, indent=2) if args.json else format_workers(workers))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from rlmq.fleet import fleet_stats, format_stats

    stats = fleet_stats(_client(args), window=args.window)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_exporter(args: argparse.Namespace) -> int:
    from rlmq.exporter import serve

    client = _client(args)
    client.list_runs(limit=1)  # an unreachable Redis is one line now, not an error at every scrape
    print(f"rlmq exporter: http://{args.address}:{args.port}/metrics  (Ctrl-C stops it)", file=sys.stderr, flush=True)
    serve(client.redis, args.address, args.port)
    return 0


def add_view_commands(add: Callable[..., argparse.ArgumentParser], port_type: Callable[[str], int]) -> None:
    p = add("trace", cmd_trace, "show a run's trajectory: each step's reasoning, code, output, sub-calls, timings")
    p.add_argument("run")
    p.add_argument("--json", action="store_true", help="one JSON document (run, usage, steps)")
    p.add_argument("--jsonl", action="store_true", help="one JSON step per line")
    p.add_argument("--depth", type=_number(int, "a whole number of levels"), default=None,
                   help="levels of child runs (rlm_query) to nest under the steps that started them (default all)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="highlight code (Pygments, if installed); auto: on a terminal")

    p = add("ui", cmd_ui, "serve run pages (a small web app): runs, live progress, steps, usage and cost")
    p.add_argument("--port", type=port_type, default=5556)
    p.add_argument("--address", default="127.0.0.1",
                   help="bind address (default loopback; anything else needs basic auth)")
    p.add_argument("--basic-auth", metavar="USER:PASSWORD", help="default: FLOWER_BASIC_AUTH")

    p = add("workers", cmd_workers, "list workers per queue with their active runs and sub-tasks")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=_number(float, "a number of seconds"), default=1.5,
                   help="how long to wait for workers to answer")

    p = add("stats", cmd_stats, "fleet numbers: queue depths, sub-calls/s, cache hit rate, 429s, live sandboxes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--window", type=_number(int, "a whole number of seconds"), default=60)

    p = add("exporter", cmd_exporter, "serve the fleet's Prometheus metrics at /metrics (read from Redis)")
    p.add_argument("--port", type=port_type, default=9808)
    p.add_argument("--address", default="127.0.0.1", help="bind address (0.0.0.0 for a Prometheus elsewhere)")
