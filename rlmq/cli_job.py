"""``rlmq job ...``: corpus jobs from the command line (submit, status, watch, results, list, cancel, resume).

``rlmq.cli`` wires them in with ``add_job_commands``; the work is in ``rlmq.jobs``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlmq.client import Client
    from rlmq.jobs import ItemSource

__all__ = ["add_job_commands"]


def _client(args: argparse.Namespace) -> Client:
    from rlmq.client import Client

    return Client(getattr(args, "redis_url", None))


def _items(args: argparse.Namespace, shared: dict[str, Any]) -> ItemSource:
    from rlmq.client import check_signature
    from rlmq.inputs import InputError, parse_input_arg
    from rlmq.jobs import combine, each_item, question_items

    sources = []
    for text in args.each:
        name, value = parse_input_arg(text)
        sources.append(each_item(name, value, split=args.split))
    if args.questions:
        name, sep, path = args.questions.rpartition("=")
        if not sep:  # the one signature input that neither --input nor --each gives
            given = set(shared) | {parse_input_arg(t)[0] for t in args.each}
            left = [n for n in check_signature(args.signature) if n not in given]
            if len(left) != 1:
                raise InputError(f"--questions: say which input the questions are (NAME=FILE); the signature "
                                 f"leaves {', '.join(left) or 'none'}")
            name = left[0]
        sources.append(question_items(name, path))
    if not sources:
        raise InputError("a job needs items: --each NAME=@dir/ (or @file.jsonl), or --questions FILE")
    return combine(sources, zipped=args.zip)


def _shared(args: argparse.Namespace) -> dict[str, Any]:
    from rlmq.inputs import InputError, load_input_value, parse_input_arg

    shared: dict[str, Any] = {}
    for text in args.input:
        name, value = parse_input_arg(text)
        if name in shared:
            raise InputError(f"input {name!r} is given twice")
        shared[name] = load_input_value(value)
    return shared


def _submit(args: argparse.Namespace, client: Client, sample: int | None) -> str:
    shared = _shared(args)
    items = _items(args, shared)
    return client.submit_job(args.signature, shared, items(), tools=args.tool, max_active=args.max_active,
                             max_cost=args.max_cost, sample=sample, seed=args.seed, lm=args.lm, sub_lm=args.sub_lm,
                             lm_api_base=args.api_base, sandbox=args.sandbox, max_iters=args.max_iters,
                             max_llm_calls=args.max_llm_calls, time_limit=args.time_limit, max_tokens=args.max_tokens)


def _quoted(args: argparse.Namespace, client: Client, job_id: str) -> None:
    from rlmq.job_quote import quote, wait_sample

    print(job_id, flush=True)
    print(f"running a sample of {args.sample} item(s) to quote the job...", file=sys.stderr, flush=True)
    wait_sample(client, job_id, timeout=args.timeout)
    print("\n".join(quote(client, job_id).lines()), file=sys.stderr)


def cmd_job_submit(args: argparse.Namespace) -> int:
    """Without --max-cost: submit and start. With it: a quote first, started only if its p95 fits."""
    from rlmq.job_quote import start_job

    client = _client(args)
    if args.max_cost is None:
        print(_submit(args, client, None))
        return 0
    job_id = _submit(args, client, args.sample)
    _quoted(args, client, job_id)
    start_job(client, job_id, max_cost=args.max_cost, force=args.force)
    print(f"{job_id} started", file=sys.stderr)
    return 0


def cmd_job_quote(args: argparse.Namespace) -> int:
    client = _client(args)
    job_id = _submit(args, client, args.sample)
    _quoted(args, client, job_id)
    print(f"start it with `rlmq job start {job_id}` (the sample is not run again), or `rlmq job cancel {job_id}`",
          file=sys.stderr)
    return 0


def cmd_job_start(args: argparse.Namespace) -> int:
    from rlmq.job_quote import start_job

    start_job(_client(args), args.job, max_cost=args.max_cost, force=args.force)
    print(f"{args.job}  started")
    return 0


def cmd_job_status(args: argparse.Namespace) -> int:
    from rlmq.jobs import job_summary

    summary = job_summary(_client(args), args.job)
    print(json.dumps(summary.to_json_dict(), indent=2) if args.json else "\n".join(summary.lines()))
    return 0


def cmd_job_watch(args: argparse.Namespace) -> int:
    """A progress bar with ETA on stderr until the job ends."""
    from rlmq.jobs import job_summary

    client = _client(args)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while True:
        summary = job_summary(client, args.job, failed_shown=0)
        record = summary.record
        total = record.total if record.total is not None else record.stored
        done = record.settled
        width = 30
        filled = int(width * done / total) if total else 0
        eta = "" if summary.eta_seconds is None else f" ETA {summary.eta_seconds:.0f}s"
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {record.status.value.lower()}"
                f" {summary.throughput:.1f}/min ${record.usage.get('cost_paid', 0.0):.4f}{eta}")
        print("\r" + line, end="", file=sys.stderr, flush=True)
        if record.status.finished:
            print(file=sys.stderr)
            return 0 if record.status.value == "DONE" and set(record.counts) <= {"SUCCEEDED"} else 1
        if deadline is not None and time.monotonic() > deadline:
            print(file=sys.stderr)
            raise TimeoutError(f"job {args.job} has not finished after {args.timeout:g}s")
        time.sleep(args.interval)


def cmd_job_results(args: argparse.Namespace) -> int:
    from rlmq.cli import CliError
    from rlmq.job_export import ExportError, export_results, format_of

    client = _client(args)
    try:
        rows = export_results(client, args.job, args.output or sys.stdout, format_of(args.output))
    except ExportError as exc:
        raise CliError(str(exc)) from None
    if args.output:
        print(f"wrote {rows} item(s) to {args.output}", file=sys.stderr)
    return 0


def cmd_job_list(args: argparse.Namespace) -> int:
    from rlmq.jobs import list_jobs

    for r in list_jobs(_client(args), args.limit):
        submitted = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.spec.submitted_at))
        total = "?" if r.total is None else r.total
        print(f"{r.spec.job_id}  {submitted}  {r.status.value:<10}  {r.settled}/{total}  {r.spec.signature}")
    return 0


def cmd_job_cancel(args: argparse.Namespace) -> int:
    from rlmq.jobs import cancel_job

    print(f"{args.job}  {cancel_job(_client(args), args.job).value.lower()}")
    return 0


def cmd_job_resume(args: argparse.Namespace) -> int:
    from rlmq.jobs import resume_job

    n = resume_job(_client(args), args.job, retry_failed=args.retry_failed)
    print(f"{args.job}  resumed" + (f", {n} item(s) to run again" if args.retry_failed else ""))
    return 0


def add_job_commands(add: Callable[..., argparse.ArgumentParser], number: Callable[..., Callable[[str], Any]]) -> None:
    count = number(int, low=1, high=10**9, what="a whole number")
    dollars = number(float, low=1e-9, high=1e12, what="a number of dollars")
    seconds = number(float, low=1e-3, high=366 * 24 * 3600, what="a number of seconds")
    job = add("job", None, "corpus jobs: one signature over many items, one run per item")
    sub = job.add_subparsers(dest="job_command", metavar="JOB_COMMAND", required=True)

    def add_sub(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    for name, func, text in (
            ("submit", cmd_job_submit, "submit a job: one run per item, at most --max-active at once (with "
                                       "--max-cost: quoted first, refused if the p95 projection exceeds it)"),
            ("quote", cmd_job_quote, "run a random sample of the items for real and project the whole job's "
                                     "cost, tokens, sub-calls and wall time (p50/p95); `job start` runs the rest")):
        _submit_arguments(add_sub(name, func, text), count, dollars, seconds)

    p = add_sub("start", cmd_job_start, "start a quoted job (its sample's runs are reused, not paid again)")
    p.add_argument("job")
    p.add_argument("--max-cost", type=dollars, metavar="DOLLARS", help="refuse if the p95 projection exceeds it; "
                                                                      "stop the job once its runs paid this much")
    p.add_argument("--force", action="store_true", help="start even if the p95 projection exceeds --max-cost")

    p = add_sub("status", cmd_job_status, "counts per state, throughput, ETA, cost, the failed items")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")

    p = add_sub("watch", cmd_job_watch, "a progress bar with ETA until the job ends")
    p.add_argument("job")
    p.add_argument("--timeout", type=seconds)
    p.add_argument("--interval", type=seconds, default=1.0)

    p = add_sub("results", cmd_job_results, "one line per item, in item order (stdout, or -o answers.jsonl/.csv/.parquet)")
    p.add_argument("job")
    p.add_argument("-o", "--output")

    p = add_sub("list", cmd_job_list, "recent jobs")
    p.add_argument("--limit", type=count, default=20)

    p = add_sub("cancel", cmd_job_cancel, "cancel the job's queued and running runs; start no more")
    p.add_argument("job")

    p = add_sub("resume", cmd_job_resume, "feed the job again: items never started (and with --retry-failed, "
                                          "those whose run failed)")
    p.add_argument("job")
    p.add_argument("--retry-failed", action="store_true")


def _submit_arguments(p: argparse.ArgumentParser, count: Callable[[str], Any], dollars: Callable[[str], Any],
                      seconds: Callable[[str], Any]) -> None:
    p.add_argument("--signature", required=True, help='e.g. "contract: str, question: str -> answer: str"')
    p.add_argument("--each", action="append", default=[], metavar="NAME=@SOURCE",
                   help="items: one per file of @dir/ or @glob, per line of @file.jsonl, per --split piece of "
                        "@file (repeat for every combination, or with --zip)")
    p.add_argument("--zip", action="store_true", help="pair the --each sources item by item")
    p.add_argument("--questions", metavar="[NAME=]FILE", help="items: one per non-empty line of FILE")
    p.add_argument("--input", action="append", default=[], metavar="NAME=VALUE",
                   help="an input shared by every item (stored once): a literal, or @path")
    p.add_argument("--split", help="with --each @file: split it into pieces ('chapters' or a regex)")
    p.add_argument("--max-active", type=count, default=None,
                   help="the job's runs queued or running at once (default 8: twice `rlmq up`'s 4 rlm slots)")
    p.add_argument("--max-cost", type=dollars, metavar="DOLLARS",
                   help="refuse the job if its quote's p95 cost projection exceeds this; stop it once its runs "
                        "paid this much")
    p.add_argument("--lm")
    p.add_argument("--sub-lm")
    p.add_argument("--api-base")
    p.add_argument("--sandbox")
    p.add_argument("--max-iters", type=count)
    p.add_argument("--max-llm-calls", type=count)
    p.add_argument("--max-tokens", type=count, help="per run")
    p.add_argument("--time-limit", type=seconds, help="per run, seconds")
    p.add_argument("--tool", action="append", default=[], metavar="MODULE:FUNCTION")
    p.add_argument("--sample", type=count, default=10, help="items a quote runs (default 10)")
    p.add_argument("--seed", type=int, help="the quote's random choice of items, repeatable")
    p.add_argument("--force", action="store_true", help="with --max-cost: start even if the p95 projection exceeds it")
    p.add_argument("--timeout", type=seconds, help="seconds to wait for a quote's sample")
