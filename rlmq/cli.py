"""The ``rlmq`` command: submit and follow RLM runs, run workers, Flower, a local stack, the demo.

Exit codes: 0 success; 1 the run failed or was cancelled; 2 bad usage or input; 3 Redis or the
stack cannot be reached or started; 4 no such run; 5 timed out waiting. Errors are one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from rlmq.cli_job import add_job_commands
from rlmq.cli_show import add_budget_flags, add_view_commands, budget_options, print_outputs
from rlmq.progress import format_progress, progress_printer

if TYPE_CHECKING:  # imported when a command needs them: `rlmq --help` stays light
    from rlmq.client import Client
    from rlmq.store.records import RunRecord

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NO_RUN, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
EPILOG = (
    "exit codes: 0 ok, 1 run failed or cancelled, 2 bad usage or input, 3 Redis/stack unreachable, "
    "4 no such run, 5 timed out"
)


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ---- helpers -------------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> Client:
    from rlmq.client import Client

    return Client(getattr(args, "redis_url", None))


def _finish_code(record: RunRecord) -> int:
    return EXIT_OK if record.status.value == "SUCCEEDED" else EXIT_RUN_FAILED


def _wait(client: Client, run_id: str, timeout: float | None) -> int:
    record = client.wait(run_id, timeout=timeout, on_progress=progress_printer())
    if record.status.value != "SUCCEEDED":
        print(f"rlmq: run {run_id} {record.status.value.lower()}: {record.error or 'no detail'}", file=sys.stderr)
    return _finish_code(record)


# ---- commands ------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    from rlmq.inputs import open_input_value, parse_input_arg

    inputs: dict[str, Any] = {}
    for text in args.input:
        name, value = parse_input_arg(text)
        if name in inputs:
            raise CliError(f"input {name!r} is given twice")
        inputs[name] = open_input_value(value, split=args.split if value.startswith("@") else None)
    client = _client(args)
    run_id = client.submit(
        args.signature, inputs, tools=args.tool, lm=args.lm, sub_lm=args.sub_lm, lm_api_base=args.api_base,
        sandbox=args.sandbox, max_iters=args.max_iters, max_llm_calls=args.max_llm_calls,
        **budget_options(args),
    )
    print(run_id)
    sys.stdout.flush()
    if not args.wait:
        return EXIT_OK
    code = _wait(client, run_id, args.timeout)
    if code == EXIT_OK:
        print_outputs(client, run_id)
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from rlmq.trace import format_usage

    client = _client(args)
    record = client.status(args.run)
    tree = client.tree(args.run)
    if args.json:
        print(json.dumps({**json.loads(record.to_json()), "tree": tree.to_json_dict()}, ensure_ascii=False))
        return EXIT_OK
    print(f"{record.spec.run_id}  {format_progress(record)}")
    if tree.children:
        live, finished = tree.descendants()
        print(f"tree: {live + finished} child run(s), {live} live, {finished} finished · {format_usage(tree.usage())}")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    return _wait(_client(args), args.run, args.timeout)


def cmd_result(args: argparse.Namespace) -> int:
    result = _client(args).result(args.run)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    client = _client(args)
    record = client.cancel(args.run)
    if args.wait and not record.status.finished:
        record = client.wait(args.run, timeout=args.wait)
    print(f"{record.spec.run_id}  {record.status.value.lower()}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    for record in _client(args).list_runs(args.limit, children=args.all):
        submitted = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.spec.submitted_at))
        print(f"{record.spec.run_id}  {submitted}  {record.status.value:<9}  {record.spec.signature}")
    return EXIT_OK


def _stack_redis_env() -> None:
    """Without --redis-url / REDIS_URL, a worker or Flower joins the `rlmq up` stack (its URL,
    password included, is in the 0600 state file), as `rlmq submit` does."""
    from rlmq.settings import redis_url_from_env
    from rlmq.stack import running_stack_url

    if not redis_url_from_env():
        url = running_stack_url()
        if url:
            os.environ["REDIS_URL"] = url


def cmd_worker(args: argparse.Namespace) -> int:
    from rlmq.stack import LLM_THREADS, RLM_THREADS, worker_command

    pool = args.pool or "threads"
    concurrency = args.concurrency or (LLM_THREADS if args.queue == "llm" else RLM_THREADS)
    command = worker_command(args.queue, name=args.name or args.queue, concurrency=concurrency, pool=pool)
    if args.redis_url:
        os.environ["REDIS_URL"] = args.redis_url
    _stack_redis_env()
    os.execv(sys.executable, [sys.executable, *command[1:], *args.celery_args])
    return EXIT_OK  # not reached


def cmd_flower(args: argparse.Namespace) -> int:
    from rlmq.settings import load_dotenv_once
    from rlmq.stack import flower_command, generate_flower_auth, running_stack

    if args.redis_url:
        os.environ["REDIS_URL"] = args.redis_url
    _stack_redis_env()
    load_dotenv_once()
    if not os.environ.get("FLOWER_BASIC_AUTH", "").strip():
        # Never an open dashboard: the `rlmq up` stack's login if one runs, else a new one, shown once.
        stack = running_stack() or {}
        auth = (stack.get("flower") or {}).get("basic_auth") or generate_flower_auth()
        user, _, password = auth.partition(":")
        print(f"rlmq flower: login {user} / {password} (set FLOWER_BASIC_AUTH=user:password to choose one)",
              file=sys.stderr, flush=True)
        os.environ["FLOWER_BASIC_AUTH"] = auth  # Flower reads it from the environment
    os.execv(sys.executable, flower_command(port=args.port, address=args.address))
    return EXIT_OK  # not reached


def cmd_up(args: argparse.Namespace) -> int:
    import signal

    from rlmq.settings import redis_url_from_env
    from rlmq.stack import LLM_THREADS, RLM_THREADS, LocalStack, redacted_url, running_stack_url, state_file

    if running_stack_url():
        raise CliError("a stack started by `rlmq up` is already running on this machine", EXIT_UNREACHABLE)
    redis_url = args.redis_url or redis_url_from_env()  # also loads .env
    chosen_auth = os.environ.get("FLOWER_BASIC_AUTH", "").strip() or None
    stack = LocalStack(
        redis_url=redis_url, rlm_concurrency=args.rlm_concurrency or RLM_THREADS, flower_auth=chosen_auth,
        llm_concurrency=args.llm_concurrency or LLM_THREADS, flower_port=None if args.no_flower else args.flower_port,
        exporter_port=None if args.no_exporter else args.exporter_port,
    )
    # Ctrl-C and SIGTERM both stop the stack, also when started as a background job (SIGINT ignored).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        stack.start_or_explain()
        assert stack.redis_url is not None  # the stack's Redis, started if none was given
        flower = "" if args.no_flower else f"  flower: http://127.0.0.1:{args.flower_port}"
        metrics = "" if args.no_exporter else f"  metrics: http://127.0.0.1:{args.exporter_port}/metrics"
        print(f"rlmq stack is up: REDIS_URL={redacted_url(stack.redis_url)}{flower}{metrics}  logs: {stack.log_dir}",
              flush=True)
        if stack.flower_auth and not chosen_auth:  # generated: shown this once
            user, _, password = stack.flower_auth.partition(":")
            print(f"flower login: {user} / {password}", flush=True)
        elif stack.flower_auth:
            print("flower login: as FLOWER_BASIC_AUTH", flush=True)
        print(f"Redis password and Flower login are kept in {state_file()} (readable by you only); "
              "rlmq commands on this machine find them there.", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        while True:
            if stack.revive_redis():
                print(f"rlmq: Redis had stopped; restarted it on its data ({stack.redis_url})", file=sys.stderr,
                      flush=True)
            dead = stack.dead_children()
            for child in [c for c in dead if c.name == "exporter"]:  # metrics are not worth the stack
                print(f"rlmq: the metrics exporter stopped ({child.last_error_line()}); the stack goes on "
                      "without it", file=sys.stderr, flush=True)
                stack.children.remove(child)
                dead.remove(child)
            if dead:
                raise CliError(f"{dead[0].name} stopped unexpectedly: {dead[0].last_error_line()}", EXIT_UNREACHABLE)
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping the stack...", file=sys.stderr, flush=True)
        return EXIT_OK
    finally:
        stack.stop()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_demo(args: argparse.Namespace) -> int:
    from rlmq.demo import run_demo

    return EXIT_OK if run_demo(args) else EXIT_RUN_FAILED


# ---- parser --------------------------------------------------------------------------------
def _number(kind: type, *, low: float, high: float, what: str) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` in [low, high], else argparse's one-line usage error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (low <= value <= high):  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: {what} from {low:g} to {high:g}")
        return value

    return parse


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from one of rlmq.settings' parsers (their ValueError says what is wrong)."""

    def check(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} {exc}") from None

    return check


COUNT = _number(int, low=1, high=1_000_000, what="a whole number")
SECONDS = _number(float, low=0.001, high=366 * 24 * 3600, what="a number of seconds")
WAIT_SECONDS = _number(float, low=0, high=366 * 24 * 3600, what="a number of seconds")
PORT = _number(int, low=1, high=65535, what="a TCP port")


def build_parser() -> argparse.ArgumentParser:
    from rlmq.celery_config import QUEUES
    from rlmq.redis_url import redis_url_argument
    from rlmq.settings import SandboxBackend

    SANDBOXES = [b.value for b in SandboxBackend]
    parser = argparse.ArgumentParser(prog="rlmq", description="Run DSPy Recursive Language Models on a Celery fleet.",
                                     epilog=EPILOG)
    parser.add_argument("--redis-url", type=_checked(redis_url_argument),
                        help="Redis of the fleet (default: REDIS_URL, .env, or the `rlmq up` stack)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int] | None, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        p.set_defaults(func=func)
        return p

    p = add("submit", cmd_submit, "submit an RLM run")
    p.add_argument("--signature", required=True, help='DSPy signature, e.g. "chapters: list[str], task: str -> answer: str"')
    p.add_argument("--input", action="append", default=[], metavar="NAME=VALUE",
                   help="an input: a literal value, or @path for a file, directory or glob (text, .json, .jsonl)")
    p.add_argument("--split", help="split @-inputs into lists: 'chapters' for a book, or a regex")
    p.add_argument("--lm", help="root model (LiteLLM string); default RLMQ_LM; others only if the workers' "
                                "RLMQ_ALLOWED_MODELS allow them")
    p.add_argument("--sub-lm", help="model for llm_query sub-calls; default RLMQ_SUB_LM or the root model")
    p.add_argument("--api-base", help="OpenAI-compatible endpoint for both models; default RLMQ_LM_API_BASE; "
                                      "others only if the workers' RLMQ_ALLOWED_API_BASES list them")
    p.add_argument("--max-iters", type=COUNT, help="REPL iterations before the model must answer "
                                                   "(default and maximum: the workers' settings)")
    p.add_argument("--max-llm-calls", type=COUNT, help="sub-LLM calls allowed for the run "
                                                       "(default and maximum: the workers' settings)")
    add_budget_flags(p)
    p.add_argument("--sandbox", choices=SANDBOXES, help="where generated code runs (default RLMQ_SANDBOX; others "
                                                        "only if the workers' RLMQ_ALLOWED_SANDBOXES allow them)")
    p.add_argument("--tool", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="a Python function sandbox code may call by its name (repeatable); imported on the "
                        "workers, so its module must be installed or on their PYTHONPATH, and allowed by their "
                        "RLMQ_ALLOWED_TOOLS")
    p.add_argument("--wait", action="store_true",
                   help="wait for the run, show progress on stderr, print its outputs (JSON) on stdout")
    p.add_argument("--timeout", type=SECONDS, help="with --wait: give up after this many seconds")

    p = add("status", cmd_status, "show a run's status and progress")
    p.add_argument("run")
    p.add_argument("--json", action="store_true", help="the whole record as JSON")

    p = add("watch", cmd_watch, "follow a run's progress until it ends")
    p.add_argument("run")
    p.add_argument("--timeout", type=SECONDS)

    p = add("result", cmd_result, "print or save a finished run's result")
    p.add_argument("run")
    p.add_argument("-o", "--output", help="write the result JSON to this file")

    p = add("cancel", cmd_cancel, "stop a run (a running one stops promptly and its sandbox is deleted)")
    p.add_argument("run")
    p.add_argument("--wait", type=WAIT_SECONDS, default=30.0, help="seconds to wait for the run to stop (0: don't)")

    p = add("list", cmd_list, "list recent runs")
    p.add_argument("--limit", type=COUNT, default=20)
    p.add_argument("--all", action="store_true", help="child runs (started by rlm_query) too, not only roots")

    p = add("worker", cmd_worker, "start a worker for one queue (rlm: runs, llm: sub-LLM calls)")
    p.add_argument("queue", choices=QUEUES)
    p.add_argument("--concurrency", "-c", type=COUNT, help="default: 32 (threads: runs or sub-calls at once)")
    p.add_argument("--pool", "-P", help="Celery pool (default: threads; prefork also works, at ~270 MiB a slot)")
    p.add_argument("--name", "-n", help="node name (default: the queue name)")
    p.epilog = "arguments after -- go to `celery worker` as they are. " + EPILOG

    p = add("flower", cmd_flower, "start Flower, Celery's monitor (basic auth from FLOWER_BASIC_AUTH, "
                                  "else the `rlmq up` stack's login, else a generated one)")
    p.add_argument("--port", type=PORT, default=5555)
    p.add_argument("--address", default="127.0.0.1")

    p = add("up", cmd_up, "run the whole stack on this machine in the foreground (Ctrl-C stops it all)")
    p.add_argument("--rlm-concurrency", type=COUNT, help="runs at once (threads; default: 32)")
    p.add_argument("--llm-concurrency", type=COUNT, help="sub-call batches at once (threads; default: 32)")
    p.add_argument("--flower-port", type=PORT, default=5555)
    p.add_argument("--no-flower", action="store_true")
    p.add_argument("--exporter-port", type=PORT, default=9808, help="Prometheus metrics (`rlmq exporter`)")
    p.add_argument("--no-exporter", action="store_true")

    add_view_commands(add, PORT)  # trace, ui, workers, stats (rlmq.cli_show)
    add_job_commands(add, _number)  # job submit|status|watch|results|list|cancel|resume (rlmq.cli_job)

    p = add("demo", cmd_demo, "run a reference analysis (brings up a local stack if none is running)")
    p.add_argument("name", choices=["monte-cristo"])
    p.add_argument("--output-dir", default="rlmq-output", help="where the JSON and the PNG go")
    p.add_argument("--lm", help="root model; default RLMQ_LM")
    p.add_argument("--sub-lm", help="sub-call model; default RLMQ_SUB_LM or the root model")
    p.add_argument("--max-iters", type=COUNT, help="default: the fleet's RLMQ_MAX_ITERS")
    p.add_argument("--max-llm-calls", type=COUNT, help="default: the fleet's RLMQ_MAX_LLM_CALLS (the demo needs ~120)")
    p.add_argument("--sandbox", choices=SANDBOXES)
    p.add_argument("--timeout", type=SECONDS, default=3 * 3600)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = build_parser()
    args = parser.parse_args(argv[:len(argv) - len(passthrough) - (1 if "--" in argv else 0)])
    if passthrough and args.command != "worker":
        parser.error("only `rlmq worker` takes arguments after --")
    args.celery_args = passthrough
    from redis.exceptions import RedisError

    from rlmq.client import ClientError, RedisUnreachable, UnknownRun, redis_problem, resolve_redis_url
    from rlmq.inputs import InputError
    from rlmq.stack import StackError

    try:
        code: int = args.func(args)
        return code
    except UnknownRun as exc:
        return _fail(str(exc), EXIT_NO_RUN)
    except ClientError as exc:
        unreachable = isinstance(exc, RedisUnreachable) or "no Redis" in str(exc)
        return _fail(str(exc), EXIT_UNREACHABLE if unreachable else EXIT_USAGE)
    except RedisError as exc:  # a call outside Client.call (the job commands' stores): the same one line
        what = " ".join(filter(None, (args.command, getattr(args, "job_command", None))))
        problem = redis_problem(resolve_redis_url(getattr(args, "redis_url", None)), what, exc)
        return _fail(str(problem), EXIT_UNREACHABLE if isinstance(problem, RedisUnreachable) else EXIT_USAGE)
    except (InputError, CliError) as exc:
        return _fail(str(exc), getattr(exc, "code", EXIT_USAGE))
    except StackError as exc:
        return _fail(str(exc), EXIT_UNREACHABLE)
    except TimeoutError as exc:
        return _fail(str(exc), EXIT_TIMEOUT)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except OSError as exc:
        return _fail(str(exc), EXIT_USAGE)


def _fail(message: str, code: int) -> int:
    print(f"rlmq: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
