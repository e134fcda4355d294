"""The Python client: submit RLM runs to the fleet and follow them.

    from tasks.client import Client
    client = Client()                      # REDIS_URL, .env, or the stack `rlmq up` started
    run_id = client.submit("chapters: list[str], task: str -> wealth_data: list[dict]",
                           {"chapters": chapters, "task": "..."}, max_iters=20)
    record = client.wait(run_id, timeout=3600)
    print(client.result(run_id)["outputs"])

Inputs go to Redis once, by content hash (``workers.blobs``); the task message carries the run id
only, and runs that share a corpus share its blob.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import redis

from tasks.app import configure
from tasks.records import RunRecord, RunSpec, RunStatus, RunStore, new_run_id
from tasks.run import enqueue_run, request_cancel
from workers.blobs import put_blobs
from workers.settings import Settings, SettingsError, redis_url_from_env
from workers.stack import running_stack_url

__all__ = ["Client", "ClientError", "UnknownRun"]

# Run options a client may set per run (names of workers.settings.Settings fields).
RUN_OPTIONS = ("lm", "sub_lm", "lm_api_base", "sandbox", "max_iters", "max_llm_calls")


class ClientError(RuntimeError):
    """A one-line, human-readable reason a client call could not be done."""


class UnknownRun(ClientError, LookupError):
    pass


def resolve_redis_url(explicit: str | None = None) -> str:
    url = explicit or redis_url_from_env() or running_stack_url()
    if not url:
        raise ClientError(
            "no Redis to talk to: set REDIS_URL (in the environment or .env), or start a local stack with `rlmq up`"
        )
    return url


class Client:
    def __init__(self, redis_url: str | None = None) -> None:
        self.redis_url = resolve_redis_url(redis_url)
        configure(self.redis_url)
        self.redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=5)
        self.store = RunStore(self.redis)

    def _call(self, what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except redis.exceptions.ConnectionError as exc:
            raise ClientError(f"cannot reach Redis at {self.redis_url} ({what}): {exc}") from None

    # ---- submit ----------------------------------------------------------------------------
    def submit(self, signature: str, inputs: dict[str, Any], **options: Any) -> str:
        """Store the inputs (once per content), record the run, enqueue it; return its run id."""
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
        run_options = {k: v for k, v in options.items() if v is not None}
        bad = sorted(set(run_options) - set(RUN_OPTIONS))
        if bad:
            raise ClientError(f"unknown run option(s) {', '.join(bad)}; known: {', '.join(RUN_OPTIONS)}")
        try:
            Settings(redis_url=self.redis_url).with_options(run_options)
        except SettingsError as exc:
            raise ClientError(str(exc)) from None

        run_id = new_run_id()

        def enqueue() -> None:
            refs = put_blobs(self.redis, inputs)
            enqueue_run(RunSpec(run_id=run_id, signature=signature, inputs=refs, options=run_options), client=self.redis)

        self._call("submit", enqueue)
        return run_id

    # ---- follow ----------------------------------------------------------------------------
    def status(self, run_id: str) -> RunRecord:
        record = self._call("status", lambda: self.store.get(run_id))
        if record is None:
            raise UnknownRun(f"no run with id {run_id!r}")
        return record

    def wait(self, run_id: str, timeout: float | None = None,
             on_progress: Callable[[RunRecord], None] | None = None, interval: float = 0.5) -> RunRecord:
        """Block until the run has finished (or ``timeout`` seconds passed: ``TimeoutError``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.status(run_id)
            if on_progress is not None:
                on_progress(record)
            if record.status.finished:
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} has not finished after {timeout:g}s (status {record.status.value})")
            time.sleep(interval)

    def result(self, run_id: str) -> dict[str, Any]:
        record = self.status(run_id)
        if record.status is not RunStatus.SUCCEEDED:
            detail = f": {record.error}" if record.error else ""
            raise ClientError(f"run {run_id} has no result: it is {record.status.value}{detail}")
        result = self._call("result", lambda: self.store.result(run_id))
        if result is None:
            raise ClientError(f"run {run_id} succeeded but its result has expired")
        return result

    def cancel(self, run_id: str) -> RunRecord:
        """Ask the run to stop: a queued run never starts; a running one stops and deletes its sandbox."""
        record = self.status(run_id)
        if record.status.finished:
            return record

        self._call("cancel", lambda: request_cancel(run_id, client=self.redis))
        return self.status(run_id)

    def list_runs(self, limit: int = 50) -> list[RunRecord]:
        ids = self._call("list", lambda: self.store.list(limit))
        records = [self._call("list", lambda run_id=run_id: self.store.get(run_id)) for run_id in ids]
        return [r for r in records if r is not None]

    def close(self) -> None:
        self.redis.close()


def check_signature(signature: str) -> list[str]:
    """The signature's input names, or a ClientError saying why it does not parse."""
    import dspy

    try:
        parsed = dspy.Signature(signature)
    except Exception as exc:  # dspy raises ValueError, SyntaxError, TypeError... for bad strings
        raise ClientError(f"the signature {signature!r} does not parse: {exc}") from None
    if not parsed.output_fields:
        raise ClientError(f"the signature {signature!r} has no outputs (write 'inputs -> outputs')")
    return list(parsed.input_fields)
