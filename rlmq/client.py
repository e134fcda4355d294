"""The Python client: submit RLM runs to the fleet and follow them.

    from rlmq import Client
    client = Client()                      # REDIS_URL, .env, or the stack `rlmq up` started
    run_id = client.submit("chapters: list[str], task: str -> wealth_data: list[dict]",
                           {"chapters": chapters, "task": "..."}, max_iters=20)
    record = client.wait(run_id, timeout=3600)
    print(client.result(run_id)["outputs"])

Inputs go to Redis once, by content hash (``rlmq.store.blobs``); the task message carries the run id
only, and runs that share a corpus share its blob. The client sends ``run_rlm`` by name through
``rlmq.celery_config.client_app``: it never imports the worker runtime, dspy or litellm.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.sentinel import MasterNotFoundError

from rlmq.celery_config import client_app
from rlmq.flower_repr import describe_value, human_bytes
from rlmq.inputs import StreamedInput
from rlmq.redis_retry import OutageRetry
from rlmq.redis_url import connect
from rlmq.run_options import check_tools, with_options
from rlmq.run_send import cancel_run, send_run
from rlmq.settings import RUN_OPTIONS, Settings, SettingsError, load_dotenv_once, redis_url_from_env
from rlmq.stack import redacted_url, running_stack_url
from rlmq.store.blobs import CHUNK_BYTES, blob_size, put_blob, put_items
from rlmq.store.records import RunRecord, RunSpec, RunStatus, RunStore, new_run_id
from rlmq.trace import read_trajectory
from rlmq.trace_context import caller_traceparent
from rlmq.tree import RunTree, read_tree

__all__ = ["Client", "ClientError", "RedisUnreachable", "UnknownRun", "check_run_id", "check_signature", "check_tool_path", "redis_problem"]


_RETRY = OutageRetry(ExponentialBackoff(cap=1.0, base=0.05), retries=5)  # 0.1 + 0.2 + 0.4 + 0.8 + 1 s
_T = TypeVar("_T")


class ClientError(RuntimeError):
    """A one-line, human-readable reason a client call could not be done."""


class UnknownRun(ClientError, LookupError):
    pass


class RedisUnreachable(ClientError, ConnectionError):
    """Redis did not answer (down, restarting, or the URL is wrong)."""


def redis_problem(url: str, what: str, exc: redis.exceptions.RedisError) -> ClientError:
    """The one-line error for a Redis call that failed: unreachable, a refused password, or another error."""
    where = redacted_url(url)
    if isinstance(exc, redis.exceptions.AuthenticationError):  # NOAUTH, WRONGPASS, HELLO before AUTH
        return RedisUnreachable(f"Redis at {where} refused the password ({what}): missing or wrong; "
                                "give it in the URL as redis://:PASSWORD@host:port")
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        # redis-py's own text for this one is every Sentinel client's repr: kilobytes on one line
        why = "no Sentinel names a primary it can reach" if isinstance(exc, MasterNotFoundError) else str(exc)
        return RedisUnreachable(f"cannot reach Redis at {where} ({what}): {why}")
    return ClientError(f"Redis at {where} answered an error ({what}): {str(exc).splitlines()[0] if str(exc) else exc!r}")


def resolve_redis_url(explicit: str | None = None) -> str:
    url = explicit or redis_url_from_env() or running_stack_url()
    if not url:
        raise ClientError(
            "no Redis to talk to: set REDIS_URL (in the environment or .env), or start a local stack with `rlmq up`"
        )
    return url


class Client:
    def __init__(self, redis_url: str | None = None, *, blob_chunk_bytes: int = CHUNK_BYTES) -> None:
        """``blob_chunk_bytes``: no Redis value an input is stored in is larger (inputs past it are chunked)."""
        self.redis_url = resolve_redis_url(redis_url)
        self.blob_chunk_bytes = blob_chunk_bytes
        # A restart of Redis (``rlmq up`` brings its own back within a second) is waited out by redis-py;
        # longer outages reach the caller as RedisUnreachable after ~2.5 s, so a wrong URL is said soon.
        self.redis = connect(self.redis_url, socket_connect_timeout=5, retry=_RETRY,
                                          retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        self.store = RunStore(self.redis)
        self.celery = client_app(self.redis_url)

    def call(self, what: str, action: Callable[[], _T]) -> _T:
        try:
            return action()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise redis_problem(self.redis_url, what, exc) from None

    # ---- submit ----------------------------------------------------------------------------
    def submit(self, signature: str, inputs: dict[str, Any], *, tools: list[str] | tuple[str, ...] = (),
               **options: Any) -> str:
        """Store the inputs (once per content), record the run, enqueue it; return its run id.

        ``tools`` are ``"package.module:function"`` paths, imported on the worker and callable
        from the run's sandbox code by the function's name.
        """
        input_names = check_signature(signature)
        unknown = sorted(set(inputs) - set(input_names))
        missing = sorted(set(input_names) - set(inputs))
        if unknown:
            raise ClientError(f"input(s) {', '.join(unknown)} are not in the signature's inputs ({', '.join(input_names)})")
        if missing:
            raise ClientError(f"missing input(s) {', '.join(missing)} for the signature")
        empty = sorted(name for name, value in inputs.items() if value in ("", [], {}, None))
        if empty:
            raise ClientError(f"input(s) {', '.join(empty)} are empty")
        run_options, tool_paths = self.checked_options(options, tools)

        run_id = new_run_id()

        def store_and_enqueue() -> None:
            refs, described = self.store_inputs(inputs)
            self.enqueue(RunSpec(run_id=run_id, signature=signature, inputs=refs, options=run_options,
                                 tools=tool_paths, traceparent=caller_traceparent()),
                         described=described)

        self.call("submit", store_and_enqueue)
        return run_id

    def store_inputs(self, inputs: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
        """({name: digest}, {name: kind and size}); a ``StreamedInput`` is read from its files as it is
        stored, chunk by chunk, so the corpus is never held whole (nor as a list, its JSON and its bytes)."""
        refs: dict[str, str] = {}
        described: dict[str, str] = {}
        for name, value in inputs.items():
            if isinstance(value, StreamedInput):
                stored = put_items(self.redis, value.items(), chunk_bytes=self.blob_chunk_bytes)
                refs[name], described[name] = stored.digest, f"list[{stored.items}], {human_bytes(stored.size)}"
            else:
                refs[name] = put_blob(self.redis, value, chunk_bytes=self.blob_chunk_bytes)
                described[name] = describe_value(value)
        return refs, described

    def checked_options(self, options: dict[str, Any], tools: list[str] | tuple[str, ...] = ()
                        ) -> tuple[dict[str, Any], list[str]]:
        """The run options given (None dropped) and the tool paths, checked against this machine's pins
        when it has them (the workers check again with theirs); ClientError if refused."""
        tool_paths = [check_tool_path(t) for t in tools]
        run_options = {k: v for k, v in options.items() if v is not None}
        bad = sorted(set(run_options) - set(RUN_OPTIONS))
        if bad:
            raise ClientError(f"unknown run option(s) {', '.join(bad)}; known: {', '.join(RUN_OPTIONS)}")
        try:
            own = self._own_settings()
            if own is not None:
                whose = "this machine's rlmq settings (the workers check again with theirs)"
                with_options(own, run_options, whose=whose)
                check_tools(own, tool_paths, whose=whose)
            else:
                with_options(Settings(redis_url=self.redis_url), run_options, pinned=False)
        except SettingsError as exc:
            raise ClientError(str(exc)) from None
        return run_options, tool_paths

    def submit_job(self, signature: str, shared: dict[str, Any], items: Iterable[dict[str, Any]], *,
                   tools: list[str] | tuple[str, ...] = (), **options: Any) -> str:
        """A corpus job: one run per item (``{name: value}`` for the inputs ``shared`` does not give),
        at most ``max_active`` (default ``rlmq.jobs.DEFAULT_MAX_ACTIVE``) queued or running at once;
        ``max_cost`` stops it once its runs have spent that many dollars. Items are streamed in
        (``rlmq.jobs``); returns the job id."""
        from rlmq.jobs import submit_job

        return submit_job(self, signature, shared, items, tools=tools, **options)

    def _own_settings(self) -> Settings | None:
        """This machine's settings when they name a model, i.e. when it is configured like a worker
        (the same .env, or `rlmq up`'s environment): then a run option its pins refuse is refused at
        submit. Otherwise options are only checked for form; the workers' pins always apply."""
        load_dotenv_once()
        try:
            own = Settings.from_env({**os.environ, "REDIS_URL": self.redis_url}, require_lm=False)
        except SettingsError:
            return None
        return own if own.lm else None

    def enqueue(self, spec: RunSpec, *, described: dict[str, str] | None = None) -> None:
        """Record a run whose inputs are stored already and send ``run_rlm`` for it (the run id is the task id).

        ``described``: each input's kind and size (``store_inputs``), shown by Flower; without
        it the blobs' sizes in Redis are shown.
        """
        send_run(self.store, self.celery, spec, described or self._blob_sizes(spec))

    def _blob_sizes(self, spec: RunSpec) -> dict[str, str]:
        return {name: human_bytes(blob_size(self.redis, digest)) for name, digest in spec.inputs.items()}

    # ---- follow ----------------------------------------------------------------------------
    def status(self, run_id: str) -> RunRecord:
        check_run_id(run_id)
        record = self.call("status", lambda: self.store.get(run_id))
        if record is None:
            raise UnknownRun(f"no run with id {run_id!r}")
        return record

    def wait(self, run_id: str, timeout: float | None = None,
             on_progress: Callable[[RunRecord], None] | None = None, interval: float = 0.5) -> RunRecord:
        """Block until the run has finished (or ``timeout`` seconds passed: ``TimeoutError``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                record = self.status(run_id)
            except RedisUnreachable:  # Redis away longer than the client's retries: a wait outlasts it
                if deadline is not None and time.monotonic() > deadline:
                    raise
                time.sleep(interval)
                continue
            if on_progress is not None:
                on_progress(record)
            if record.status.finished:
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} has not finished after {timeout:g}s (status {record.status.value})")
            time.sleep(interval)

    def result(self, run_id: str) -> dict[str, Any]:
        """A succeeded run's result document (JSON): ``outputs``, ``final_reasoning``, DSPy's
        ``trajectory``, ``steps``, and the last ``progress`` and its ``usage`` (the JSON of
        ``rlmq.store.records.Progress`` and ``Usage``; ``usage["total"]`` sums root and sub-calls)."""
        record = self.status(run_id)
        if record.status is not RunStatus.SUCCEEDED:
            detail = f": {record.error}" if record.error else ""
            raise ClientError(f"run {run_id} has no result: it is {record.status.value}{detail}")
        result = self.call("result", lambda: self.store.result(run_id))
        if result is None:
            raise ClientError(f"run {run_id} succeeded but its result has expired")
        return result

    def trace(self, run_id: str) -> list[dict[str, Any]]:
        """The run's steps so far (reasoning, code, output, timings, usage), oldest first."""
        self.status(run_id)  # UnknownRun for a run that does not exist
        return self.call("trace", lambda: read_trajectory(self.redis, run_id))

    def cancel(self, run_id: str) -> RunRecord:
        """Ask the run to stop: a queued run never starts; a running one stops and deletes its sandbox.

        A run still QUEUED is recorded CANCELLED at once: a revoked message never reaches
        ``run_rlm``, and a worker that takes it anyway sees a finished record and skips it.
        """
        record = self.status(run_id)
        if record.status.finished:
            return record

        self.call("cancel", lambda: cancel_run(self.store, self.celery, run_id))
        return self.status(run_id)

    def tree(self, run_id: str, depth: int | None = None) -> RunTree:
        """The run and its child runs (``rlm_query``) down to ``depth`` levels (None: all), with their usage."""
        self.status(run_id)
        tree: RunTree | None = self.call("tree", lambda: read_tree(self.store, run_id, depth=depth))
        if tree is None:
            raise UnknownRun(f"no run with id {run_id!r}")
        return tree

    def list_runs(self, limit: int = 50, *, children: bool = False) -> list[RunRecord]:
        """The most recent runs: roots only, unless ``children`` (runs started by rlm_query too)."""
        def read() -> list[RunRecord]:
            found: list[RunRecord] = []
            page, start = max(limit, 50), 0
            while len(found) < limit:
                ids = self.store.list(page, start=start)
                records = (self.store.get(run_id) for run_id in ids)
                found += [r for r in records if r is not None and (children or not r.spec.parent)]
                if len(ids) < page:
                    break
                start += page
            return found[:limit]

        return self.call("list", read)

    def close(self) -> None:
        self.redis.close()
        self.celery.close()


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_signature(signature: str) -> list[str]:
    """The signature's input names, or a ClientError saying why it does not parse.

    DSPy's string form is ``"name[: type], ... -> name[: type], ..."``. This reads the names only
    (the worker parses the whole signature with DSPy and fails the run if a type does not), so
    the client never imports dspy.
    """
    if not isinstance(signature, str) or signature.count("->") != 1:
        raise ClientError(f"the signature {signature!r} does not parse: write 'inputs -> outputs', "
                          "e.g. 'chapters: list[str], task: str -> answer: str'")
    sides = [_field_names(side, signature) for side in signature.split("->")]
    if not sides[1]:
        raise ClientError(f"the signature {signature!r} has no outputs (write 'inputs -> outputs')")
    names = sides[0] + sides[1]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ClientError(f"the signature {signature!r} names {', '.join(repeated)} more than once")
    return sides[0]


def _field_names(side: str, signature: str) -> list[str]:
    names, depth, current = [], 0, ""
    for ch in side + ",":
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            if current.strip():
                names.append(current.split(":", 1)[0].strip())
            current = ""
        else:
            current += ch
    for name in names:
        if not _NAME.fullmatch(name):
            raise ClientError(f"the signature {signature!r} does not parse: {name!r} is not a field name")
    return names


_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def check_run_id(run_id: str) -> str:
    """A run id as rlmq makes them (hex) or as a user may choose one; ClientError otherwise."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        shown = run_id if len(str(run_id)) <= 40 else str(run_id)[:40] + "..."
        raise ClientError(f"{shown!r} is not a run id (1-128 letters, digits, '.', '_' or '-'; see `rlmq list`)")
    return run_id


def check_tool_path(path: str) -> str:
    """A user tool as ``package.module:function``, checked for form (the worker imports it)."""
    module, sep, function = str(path).strip().partition(":")
    if not (sep and function.isidentifier() and module
            and all(part.isidentifier() for part in module.split("."))):
        raise ClientError(f"tool {path!r} must be written as package.module:function")
    return f"{module}:{function}"
