"""``SandboxInterpreter``: DSPy 3.4's ``CodeInterpreter`` over any sandbox backend.

One execute: stage the variables (large ones uploaded once per content hash), send one driver line
to the sandbox's persistent context, and meanwhile long-poll the in-sandbox broker, running every
tool call it hands over on a host thread pool, until the runtime's outcome arrives.

Errors come in two tiers. The code's own (``SyntaxError``, ``CodeExecutionError``) go back to the
model and the session lives on. Anything that breaks the sandbox or the protocol (``SandboxError``,
an interrupt, a timeout) kills the sandbox and marks the interpreter dead: it never silently
starts a fresh session with the state gone.

Step clock: with ``tool_wait_limit`` > 0 the interpreter enforces ``execution_timeout`` itself, on
the time the step spends outside host tool calls (a step waiting on ``llm_query_batched`` is not
running its own code), and hands the backend ``execution_timeout + tool_wait_limit`` as a backstop.
With ``tool_wait_limit=0`` (the default) the backend enforces ``execution_timeout`` on wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import inspect
import json
import keyword
import logging
import secrets
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

from dspy.primitives.code_interpreter import CodeExecutionError, CodeInterpreterError, FinalOutput

from broker_bridge.backends.base import (
    Sandbox,
    SandboxDied,
    SandboxError,
    SandboxInfo,
    SandboxSpec,
    SandboxStartError,
    SandboxTimeout,
)
from broker_bridge.host_client import BrokerClient, BrokerUnreachable
from broker_bridge.sandbox import protocol
from broker_bridge.step_clock import StepClock

logger = logging.getLogger(__name__)

RUNTIME_NAME = "__rlmq"  # the runtime object's name in the sandbox namespace
RESERVED_NAMES = frozenset({"SUBMIT", "__builtins__", RUNTIME_NAME})
POLL_WAIT_SECONDS = 5.0
EXECUTION_INSTRUCTIONS = (
    "Code runs as Python 3 in a persistent sandbox session: variables, imports and functions persist "
    "between steps. Host tools and SUBMIT are global functions; call tools with JSON-compatible arguments. "
    "Output longer than the per-step limit is cut, and the cut is stated. Threads may call tools "
    "concurrently; prefer llm_query_batched for many prompts."
)


@dataclass(frozen=True)
class StoredInput:
    """A variable whose JSON text is stored elsewhere (a run's input blob): when ``value`` is bound, the
    sandbox gets ``read()`` (``size`` bytes, whose SHA-256 is ``sha256``) as it is, and the host never
    encodes the value itself."""

    value: Any
    sha256: str
    size: int
    read: Callable[[], bytes | bytearray]


class SandboxInterpreter:
    """A ``dspy.primitives.CodeInterpreter`` whose code runs in a sandbox (one per interpreter).

    Sandbox hooks, each given a ``SandboxInfo``: ``on_sandbox_creating`` before the backend creates
    anything (register a lease here: the sandbox's name and labels are already fixed, so a reaper can
    find it even if the worker dies mid-boot); ``on_sandbox_created`` once it booted;
    ``on_sandbox_destroyed`` after it was destroyed. A failed boot calls no further hook: the backend
    has tried to delete what it made, and what ``on_sandbox_creating`` registered stays for a reaper.

    A large variable (past ``inline_limit``) is encoded, hashed and uploaded once per object: the same
    object passed again is taken as unchanged (DSPy passes the same input objects every step), so send
    new content as a new object, not as the old one changed in place. ``stored_inputs`` name values
    whose JSON text the caller has already (a run's input blobs): those are uploaded from it, not encoded.
    """

    execution_instructions = EXECUTION_INSTRUCTIONS

    def __init__(
        self,
        backend_factory: Callable[[], Sandbox],
        *,
        tools: dict[str, Callable[..., Any]] | None = None,
        output_fields: list[dict[str, Any]] | None = None,
        execution_timeout: float = 300.0,
        tool_wait_limit: float = 0.0,
        labels: dict[str, str] | None = None,
        on_sandbox_creating: Callable[[SandboxInfo], None] | None = None,
        on_sandbox_created: Callable[[SandboxInfo], None] | None = None,
        on_sandbox_destroyed: Callable[[SandboxInfo], None] | None = None,
        tool_concurrency: int = 32,
        output_limit: int = 100_000,
        line_limit: int = 10_000,
        inline_limit: int = 64 * 1024,
        stored_inputs: Sequence[StoredInput] = (),
    ) -> None:
        if execution_timeout <= 0:
            raise ValueError("execution_timeout must be positive")
        self.tools: dict[str, Callable[..., Any]] = dict(tools or {})
        self.output_fields = output_fields
        self.execution_timeout = execution_timeout
        self.tool_wait_limit = max(0.0, tool_wait_limit)
        self._clock = StepClock()
        self._backend_factory = backend_factory
        self._labels = dict(labels or {})
        self._on_creating = on_sandbox_creating
        self._on_created = on_sandbox_created
        self._on_destroyed = on_sandbox_destroyed
        self._tool_concurrency = tool_concurrency
        self._output_limit, self._line_limit, self._inline_limit = output_limit, line_limit, inline_limit
        self._backend: Sandbox | None = None
        self._client: BrokerClient | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._uploaded: set[str] = set()
        # id(value) -> (value, its input file): a value passed again (DSPy passes the same input objects
        # every step) is not encoded and hashed again. The value is held so its id cannot be reused.
        self._staged: dict[int, tuple[Any, protocol.InputFile]] = {}
        self._stored = {id(stored.value): stored for stored in stored_inputs if stored.size > inline_limit}
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._dead_reason: str | None = None
        self._ended = False
        self.sandbox_id: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def runtime_dir(self) -> str | None:
        """Where the runtime and the uploaded inputs live inside the sandbox (while it is alive)."""
        return self._backend.runtime_dir if self._backend is not None else None

    @property
    def bytes_sent(self) -> int:
        return self._backend.bytes_sent if self._backend is not None else 0

    def start(self) -> None:
        with self._state_lock:
            self._check_usable()
            if self._backend is not None:
                return
            host_token = secrets.token_urlsafe(32)
            sandbox_token = secrets.token_urlsafe(32)
            self.sandbox_id = f"rlmq-{uuid.uuid4().hex[:16]}"
            spec = SandboxSpec(
                sandbox_id=self.sandbox_id,
                host_token_sha256=protocol.token_digest(host_token),
                sandbox_token=sandbox_token,
                labels={"rlmq.sandbox": self.sandbox_id, **self._labels},
            )
            backend = self._backend_factory()
            if self._on_creating is not None:
                # Before anything exists (a lease, say): a worker killed during the boot then still
                # leaves a record a reaper can act on. A failed hook creates nothing.
                try:
                    self._on_creating(backend.planned_info(spec))
                except Exception as exc:
                    raise SandboxStartError(f"could not register sandbox {spec.sandbox_id} before creating it: "
                                            f"{exc}") from exc
            endpoint = backend.boot(spec)  # cleans up after itself when it raises
            self._backend = backend
            try:
                if self._on_created is not None:
                    self._on_created(backend.info())
                self._client = BrokerClient(endpoint.url, endpoint.headers, host_token, counter=backend)
                self._executor = ThreadPoolExecutor(self._tool_concurrency, thread_name_prefix="rlmq-tool")
                bootstrap = (
                    f"import sys\nsys.path.insert(0, {backend.runtime_dir!r})\nimport runtime as _rlmq_runtime\n"
                    f"{RUNTIME_NAME} = _rlmq_runtime.Runtime({endpoint.inside_url!r}, {sandbox_token!r}, "
                    f"{backend.runtime_dir!r}, output_limit={self._output_limit}, line_limit={self._line_limit})\n"
                    "del sys, _rlmq_runtime\n"
                )
                backend.run_code(bootstrap, timeout=60)
            except BaseException as exc:
                self._raise_terminal_error(f"sandbox start failed: {exc}", exc, wrap=True)

    def shutdown(self) -> None:
        with self._state_lock:
            if self._ended:
                return
            self._ended = True
        self._release("shut down")

    def _check_usable(self) -> None:
        if self._dead_reason is not None:
            raise SandboxDied(f"this interpreter's sandbox is gone ({self._dead_reason}); it cannot be used again")
        if self._ended:
            raise CodeInterpreterError("this interpreter has been shut down")

    def _raise_terminal_error(self, reason: str, exc: BaseException, *, wrap: bool = False) -> NoReturn:
        """The sandbox or the protocol broke, or the caller was interrupted: kill the sandbox, mark this
        interpreter dead with ``reason``, and raise ``exc`` as itself (an interrupt or Celery's time
        limit must reach the caller unchanged); ``wrap`` turns any other ``Exception`` that is not a
        ``SandboxError`` into one, so DSPy aborts the run instead of feeding it to the model."""
        self._die(reason)
        if wrap and isinstance(exc, Exception) and not isinstance(exc, SandboxError):
            raise SandboxError(reason) from exc
        raise exc

    def _die(self, reason: str) -> None:
        if self._dead_reason is None:
            self._dead_reason = reason
        self._release(reason)

    def _release(self, reason: str) -> None:
        backend, self._backend = self._backend, None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if backend is None:
            return
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.cancel(reason)  # wake any sandbox thread still blocked on a tool
        try:
            backend.destroy()
        finally:
            if self._on_destroyed is not None:
                try:
                    self._on_destroyed(backend.info())
                except Exception:
                    logger.exception("on_sandbox_destroyed hook failed for %s", self.sandbox_id)

    # ---- execute ---------------------------------------------------------------------------
    def __call__(self, code: str, variables: dict[str, Any] | None = None) -> Any:
        return self.execute(code, variables)

    def execute(self, code: str, variables: dict[str, Any] | None = None) -> Any:
        if not isinstance(code, str):
            raise CodeInterpreterError("code must be a string")
        if not self._lock.acquire(blocking=False):
            raise CodeInterpreterError("this interpreter is already executing code")
        try:
            self.start()
            try:
                request = self._build_request(code, variables or {})
            except SandboxError as exc:  # an upload failed: the sandbox is not usable any more
                self._raise_terminal_error(str(exc), exc)
            try:
                outcome = self._run(request)
            except SandboxError as exc:
                self._raise_terminal_error(str(exc), exc)
            except BaseException as exc:  # KeyboardInterrupt, Celery's SoftTimeLimitExceeded, ...: never recoverable
                self._raise_terminal_error(f"interrupted by {type(exc).__name__}", exc)
            return self._interpret(outcome)
        finally:
            self._lock.release()

    def _build_request(self, code: str, variables: dict[str, Any]) -> protocol.ExecuteRequest:
        tool_names = list(self.tools)
        bad_tools = [n for n in tool_names if not _is_identifier(n) or n in RESERVED_NAMES]
        if bad_tools:
            raise CodeInterpreterError(f"tool names must be plain Python identifiers: {bad_tools}")
        inline: dict[str, Any] = {}
        files: dict[str, protocol.InputFile] = {}
        for name, value in variables.items():
            if not _is_identifier(name) or name in RESERVED_NAMES or name in self.tools:
                raise CodeInterpreterError(f"variable name {name!r} is not usable (reserved, a tool, or not an identifier)")
            staged = self._staged.get(id(value))
            if staged is not None and staged[0] is value:
                files[name] = staged[1]
                continue
            stored = self._stored.get(id(value))
            if stored is not None and stored.value is value:
                self._upload(stored.sha256, stored.read)
                files[name] = {"sha256": stored.sha256, "format": "json"}
                self._staged[id(value)] = (value, files[name])
                continue
            fmt, data = _encode_variable(name, value)
            if len(data) <= self._inline_limit:
                inline[name] = value if fmt == "text" else json.loads(data)
                continue
            digest = hashlib.sha256(data).hexdigest()
            self._upload(digest, data)
            files[name] = {"sha256": digest, "format": fmt}
            self._staged[id(value)] = (value, files[name])
        return protocol.execute_request(uuid.uuid4().hex, code, tool_names, self.output_fields, inline, files)

    def _upload(self, digest: str, data: bytes | Callable[[], bytes | bytearray]) -> None:
        """Send an input file once per sandbox (``data`` read only when it is sent)."""
        if digest not in self._uploaded:
            assert self._backend is not None
            self._backend.put_file(f"inputs/{digest}", data if isinstance(data, bytes) else data())
            self._uploaded.add(digest)

    def _run(self, request: protocol.ExecuteRequest) -> dict[str, Any]:
        backend, client = self._backend, self._client
        assert backend is not None and client is not None
        driver = f"{RUNTIME_NAME}.execute({json.dumps(request, ensure_ascii=False)!r}, globals())\n"
        finished = threading.Event()
        failure: list[BaseException] = []

        clock = self._clock
        clock.restart()
        backstop = self.execution_timeout + self.tool_wait_limit

        def run_code() -> None:
            try:
                backend.run_code(driver, backstop)
            except BaseException as exc:
                failure.append(exc)
            finally:
                finished.set()
                with contextlib.suppress(Exception):
                    client.wake()  # end the host's long-poll now, not at its timeout

        threading.Thread(target=run_code, name="rlmq-run-code", daemon=True).start()
        context = contextvars.copy_context()  # tools see the caller's dspy.context(...)
        outcome = None
        while outcome is None:
            drained_after_finish = finished.is_set()
            if self.tool_wait_limit and not drained_after_finish and clock.own_time() > self.execution_timeout:
                raise SandboxTimeout(f"execution exceeded the {self.execution_timeout:g}s limit (time spent waiting "
                                     "on host tools not counted); the sandbox was terminated")
            wait = POLL_WAIT_SECONDS
            if self.tool_wait_limit:
                wait = min(wait, max(0.05, self.execution_timeout - clock.own_time() + 0.05))
            try:
                messages = client.poll(0 if drained_after_finish else wait)
            except (BrokerUnreachable, PermissionError) as exc:
                finished.wait(10)
                if failure:
                    raise failure[0]  # noqa: B904 - the code runner's own error, its cause left as it was
                raise SandboxDied(f"the sandbox broker stopped answering: {exc}") from exc
            for message in messages:
                if message.get("type") == protocol.CALL:
                    assert self._executor is not None
                    clock.enter()
                    self._executor.submit(context.copy().run, self._answer_call, message, clock)
                elif message.get("type") == protocol.OUTCOME and message.get("exec_id") == request["exec_id"]:
                    outcome = message
            if outcome is None and drained_after_finish:
                if failure:
                    raise failure[0]
                raise SandboxError("the sandbox finished running code without reporting an outcome")
        if not finished.wait(30):
            raise SandboxError("the sandbox reported an outcome but its code runner did not return")
        if failure:
            raise failure[0]
        return outcome

    def _answer_call(self, call: dict[str, Any], clock: StepClock | None = None) -> None:
        try:
            result = self._invoke_tool(call)
            try:
                assert self._client is not None
                self._client.post_results([result])
            except Exception as exc:  # the sandbox is going away; execute() reports that
                logger.debug("could not post a tool result: %s", exc)
        finally:
            if clock is not None:
                clock.leave()

    def _invoke_tool(self, call: dict[str, Any]) -> protocol.ResultMessage:
        name, call_id = call.get("name"), call.get("id", "")
        tool = self.tools.get(name) if isinstance(name, str) else None
        try:
            if tool is None:
                raise NameError(f"no host tool named {name!r}")
            value = tool(**_as_keywords(tool, call.get("args") or [], call.get("kwargs") or {}))
            if inspect.isawaitable(value):
                value = _await(value)
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"host tool {name}() returned a {type(value).__name__}, which cannot cross into the sandbox "
                    f"(tools must return JSON-compatible values): {exc}"
                ) from None
        except BaseException as exc:  # a tool's failure belongs to the calling code, whatever it is
            return protocol.error_result(call_id, type(exc).__name__, str(exc) or type(exc).__name__)
        return protocol.value_result(call_id, value)

    def _interpret(self, outcome: dict[str, Any]) -> Any:
        kind, output = outcome["kind"], outcome.get("output", "")
        if kind == "final":
            return FinalOutput(outcome.get("value"))
        if kind == "syntax":
            raise SyntaxError(outcome.get("error", "invalid syntax"))
        if kind == "error":
            error = outcome.get("error", "error")
            raise CodeExecutionError(f"{output}\n{error}" if output else error)
        value = outcome.get("value")
        if value is None:
            return output or None
        return f"{output}\n{value!r}" if output else value


def _is_identifier(name: object) -> bool:
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)


def _encode_variable(name: str, value: Any) -> tuple[str, bytes]:
    if isinstance(value, str):
        return "text", value.encode("utf-8")
    try:
        return "json", json.dumps(value, ensure_ascii=False, allow_nan=False, default=_jsonable).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CodeInterpreterError(f"variable {name!r} cannot be sent to the sandbox as JSON: {exc}") from exc


def _jsonable(value: Any) -> Any:
    from pydantic_core import to_jsonable_python

    return to_jsonable_python(value)


def _as_keywords(tool: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """DSPy's tools take keyword arguments only: name positional arguments by the tool's signature."""
    if not args:
        return kwargs
    try:
        signature = inspect.signature(tool)
    except (TypeError, ValueError):
        raise TypeError(f"{getattr(tool, '__name__', 'tool')}() takes keyword arguments only") from None
    params = list(signature.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        raise TypeError(f"{getattr(tool, '__name__', 'tool')}() takes *args, which cannot be passed as keywords")
    bound = signature.bind(*args, **kwargs)  # raises TypeError with Python's own message on a bad call
    named = dict(bound.arguments)
    for param in params:
        if param.kind is param.VAR_KEYWORD:
            named.update(named.pop(param.name, {}))
    return named


def _await(awaitable: Awaitable[Any]) -> Any:
    async def wrapper() -> Any:
        return await awaitable

    return asyncio.run(wrapper())
