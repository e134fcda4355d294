"""``rlmq demo monte-cristo``: the reference analysis, run through the fleet.

Five characters' wealth (1-10) in each of the 117 chapters of *The Count of Monte Cristo*, saved
as JSON and plotted as smoothed trajectories. With no fleet to talk to, it brings up a local stack
for the duration of the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "data" / "monte_cristo.txt"
# The seed's five: whose fortunes the novel makes and unmakes.
CHARACTERS = ["Edmond Dantès", "Danglars", "Fernand Mondego (Morcerf)", "Gérard de Villefort", "Mercédès"]
SIGNATURE = "chapters: list[str], characters: list[str], task: str -> wealth_data: list[dict]"
TASK = (
    "For every chapter and each of the characters, estimate the character's wealth at that point of the "
    "story on a 1-10 scale (1 = destitute, 10 = among the richest people in France) and name the event "
    "behind it in a few words. Read the chapters with llm_query_batched (one prompt per chapter, asking "
    "for all five characters at once as JSON: {name: {\"wealth\": int, \"event\": str}}); when a "
    "character does not appear in a chapter, carry the last known wealth forward with the event "
    "\"not in this chapter\" (before the first appearance, use the first known value). Return "
    "wealth_data as a list of rows {\"chapter\": int, \"character\": str, \"wealth\": int, \"event\": str}, "
    "one row per chapter and character: 117 x 5 rows."
)


@contextlib.contextmanager
def fleet_for_demo(redis_url: str | None) -> Iterator[str]:
    """A fleet to submit to: the configured one if its workers answer, else a local stack started here."""
    from rlmq.celery_config import client_app
    from rlmq.client import ClientError, resolve_redis_url
    from rlmq.stack import LocalStack

    url: str | None = None
    workers_answer = False
    try:
        url = resolve_redis_url(redis_url)
        app = client_app(url)
        workers_answer = bool(app.control.ping(timeout=1.0))
        app.close()
    except ClientError:
        url = None
    except Exception:  # configured but unreachable Redis: a private stack is what the user needs
        url = None
    if workers_answer:
        assert url is not None
        yield url
        return
    print("rlmq: no workers are running; starting a local stack for the demo...", file=sys.stderr, flush=True)
    stack = LocalStack(redis_url=url, flower_port=None).start_or_explain()
    assert stack.redis_url is not None  # the stack's Redis, started if none was given
    try:
        yield stack.redis_url
    finally:
        stack.stop()


def run_demo(args: argparse.Namespace) -> bool:
    """Run the analysis and write the JSON and the plot; False if the run did not succeed."""
    from rlmq.client import Client
    from rlmq.demo.plot import plot_wealth
    from rlmq.inputs import load_input_value
    from rlmq.progress import progress_printer

    chapters = load_input_value(f"@{CORPUS}", split="chapters")
    assert isinstance(chapters, list)  # a split input is its parts
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with fleet_for_demo(getattr(args, "redis_url", None)) as redis_url:
        client = Client(redis_url)
        run_id = client.submit(
            SIGNATURE, {"chapters": chapters, "characters": CHARACTERS, "task": TASK},
            lm=args.lm, sub_lm=args.sub_lm, sandbox=args.sandbox,
            max_iters=args.max_iters, max_llm_calls=args.max_llm_calls,
        )
        print(f"run {run_id}: {len(chapters)} chapters, {len(CHARACTERS)} characters", file=sys.stderr, flush=True)
        record = client.wait(run_id, timeout=args.timeout, on_progress=progress_printer())
        if record.status.value != "SUCCEEDED":
            print(f"rlmq: the demo run {record.status.value.lower()}: {record.error}", file=sys.stderr)
            return False
        result = client.result(run_id)
    rows = result["outputs"]["wealth_data"]
    json_path = output_dir / "monte_cristo_wealth.json"
    json_path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    png_path = plot_wealth(rows, str(output_dir / "monte_cristo_wealth.png"))
    print(f"wrote {json_path} ({len(rows)} rows) and {png_path}")
    return True
