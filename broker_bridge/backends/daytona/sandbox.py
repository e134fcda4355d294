"""Daytona sandboxes (SDK 0.226): one cloud sandbox per interpreter.

Boot: create a private sandbox named and labelled after the spec (no env vars, no secrets), upload
the runtime files, make sure Flask is importable, start the broker in a background session, and
wait for its ``/health`` through the preview link (the host sends the link's token in
``X-Daytona-Preview-Token``). Code runs in one code-interpreter context, never retried: a retried
``run_code`` can run the code twice. The host enforces each run's timeout (destroy, then
``SandboxTimeout``); the daemon's own timeout is a later backstop, because the runtime catches the
``KeyboardInterrupt`` the daemon would use. The SDK client, creation parameters and error mapping
live in ``daytona_setup.py``.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import shlex
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from broker_bridge.backends.base import (
    BrokerEndpoint, SandboxBackend, SandboxDied, SandboxError, SandboxInfo,
    SandboxSpec, SandboxStartError, SandboxTimeout, broker_command, runtime_file_contents,
)
from broker_bridge.backends.daytona_setup import (
    PREVIEW_TOKEN_HEADER, SANDBOX_LABEL, DaytonaOptions, _message, build_create_params, daytona_client,
    describe_daytona_error, preview_headers, sandbox_labels,
)
from broker_bridge.sandbox.protocol import KEEPALIVE_MARKER, PATH_HEALTH

__all__ = [
    "DaytonaOptions", "DaytonaSandbox", "OutputLog", "PREVIEW_TOKEN_HEADER", "SANDBOX_LABEL",
    "build_create_params", "daytona_client", "delete_daytona_sandbox", "describe_daytona_error",
    "preview_headers", "reap_daytona_sandboxes",
]

log = logging.getLogger(__name__)

BROKER_SESSION = "rlmq-broker"
_PROBE_EVERY = 3.0  # seconds between checks that the starting broker has not exited
_ACTIVITY_EVERY_MIN = 60.0  # during a long run_code, refresh_activity() at most this often ...
_ACTIVITY_FRACTION = 1 / 3  # ... and at least every third of the auto-stop interval


def _is_celery_time_limit(exc: BaseException) -> bool:
    # broker_bridge does not import Celery; its time limits must pass through untouched
    return any(cls.__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded") for cls in type(exc).__mro__)


class OutputLog:
    """Logs a sandbox's streamed output line by line, minus the runtime's keep-alive lines."""

    def __init__(self, name: str, logger: logging.Logger = log, tail_chars: int = 4000,
                 max_line: int = 64 * 1024) -> None:
        self.name, self.logger, self.max_line = name, logger, max_line
        self._partial = {"stdout": "", "stderr": ""}
        self._tail: collections.deque[str] = collections.deque()
        self._tail_chars, self._tail_size = tail_chars, 0
        self._lock = threading.Lock()

    def feed(self, stream: str, text: str) -> None:
        with self._lock:
            buffered = self._partial[stream] + text
            *lines, rest = buffered.split("\n")
            while len(rest) > self.max_line:  # a runaway line is logged in pieces, never hoarded
                lines.append(rest[: self.max_line])
                rest = rest[self.max_line:]
            self._partial[stream] = rest
            for line in lines:
                self._emit(stream, line)

    def flush(self) -> None:
        with self._lock:
            for stream, rest in self._partial.items():
                if rest:
                    self._emit(stream, rest)
                self._partial[stream] = ""

    def tail(self) -> str:
        with self._lock:
            return "\n".join(self._tail)

    def _emit(self, stream: str, line: str) -> None:
        line = line.replace(KEEPALIVE_MARKER, "").rstrip("\r")
        if not line.strip():
            return
        self.logger.log(logging.INFO if stream == "stderr" else logging.DEBUG, "[%s %s] %s",
                        self.name, stream, line)
        self._tail.append(line)
        self._tail_size += len(line)
        while self._tail_size > self._tail_chars and len(self._tail) > 1:
            self._tail_size -= len(self._tail.popleft())


# ---------------------------------------------------------------- the backend

class DaytonaSandbox(SandboxBackend):
    """One Daytona sandbox. ``destroy`` is safe from any thread; the rest is single-threaded."""

    kind = "daytona"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_url: str | None = None,
        target: str | None = None,
        snapshot: str | None = None,
        image: str | None = None,
        resources: dict[str, int] | None = None,
        auto_stop_interval: int = 15,
        auto_delete_interval: int = 0,
        ephemeral: bool | None = None,
        ttl_minutes: int | None = None,
        network_block_all: bool | None = None,
        boot_timeout: float = 180.0,
        broker_port: int = 8765,
        run_grace: float = 30.0,
        runtime_subdir: str = "rlmq",
        client: Any = None,
    ) -> None:
        """Options as in ``DaytonaOptions`` (explicit here: the factory checks names against this
        signature). ``client``: a ``daytona.Daytona`` to use instead of this process's own."""
        super().__init__()
        self.options = DaytonaOptions(
            api_key=api_key, api_url=api_url, target=target, snapshot=snapshot, image=image,
            resources=resources, auto_stop_interval=auto_stop_interval,
            auto_delete_interval=auto_delete_interval, ephemeral=ephemeral, ttl_minutes=ttl_minutes,
            network_block_all=network_block_all, boot_timeout=boot_timeout, broker_port=broker_port,
            run_grace=run_grace)
        self._client = client  # tests and callers with their own client; else daytona_client()
        self._runtime_subdir = runtime_subdir
        self._runtime_dir: str | None = None
        self._spec: SandboxSpec | None = None
        self._sandbox: Any = None
        self._context: Any = None
        self._lock = threading.Lock()
        self._destroyed = False
        self._folders: set[str] = set()  # folders known to exist in the sandbox
        self.broker_log = ""  # the broker's output when it failed to come up
        self.last_execution_error: Any = None  # an exception that escaped the driver code itself

    # -- identity

    @property
    def runtime_dir(self) -> str:
        if self._runtime_dir is None:
            raise SandboxError("the Daytona sandbox has not been booted (runtime_dir is under its user's home)")
        return self._runtime_dir

    @property
    def daytona_id(self) -> str | None:
        return getattr(self._sandbox, "id", None)

    def info(self) -> SandboxInfo:
        if self._spec is None:
            raise RuntimeError("info() before boot()")
        return SandboxInfo(backend=self.kind, sandbox_id=self._spec.sandbox_id, labels=sandbox_labels(self._spec),
                           isolation="vm")

    # -- lifecycle

    def boot(self, spec: SandboxSpec) -> BrokerEndpoint:
        if self._spec is not None:
            raise RuntimeError("a DaytonaSandbox boots once")
        self._spec = spec
        opts = self.options
        deadline = time.monotonic() + opts.boot_timeout
        params = build_create_params(spec, opts)
        client = self._client or daytona_client(opts.api_key, opts.api_url, opts.target)
        try:
            sandbox = client.create(params, timeout=max(1.0, _left(deadline)))
        except BaseException as exc:
            self._delete_half_created(client, spec, exc)
            if isinstance(exc, Exception) and not _is_celery_time_limit(exc):
                raise describe_daytona_error(exc) from exc
            raise
        with self._lock:
            self._sandbox = sandbox
            destroyed_meanwhile = self._destroyed
        if destroyed_meanwhile:  # destroy() ran in another thread while create was in flight
            _delete(sandbox)
            raise SandboxStartError("the sandbox was destroyed while it was being created")
        try:
            return self._install_and_start(sandbox, spec, deadline)
        except BaseException as exc:
            destroyed_meanwhile = self._destroyed
            self.destroy()
            if not isinstance(exc, Exception) or _is_celery_time_limit(exc):
                raise
            if destroyed_meanwhile and not isinstance(exc, SandboxError):
                raise SandboxStartError("the sandbox was destroyed while it was booting") from exc
            raise describe_daytona_error(exc, during="starting the broker") from exc

    def _install_and_start(self, sandbox: Any, spec: SandboxSpec, deadline: float) -> BrokerEndpoint:
        from daytona import FileUpload, SessionExecuteRequest

        opts = self.options
        home = (sandbox.get_user_home_dir() or "/home/daytona").rstrip("/")
        self._runtime_dir = f"{home}/{self._runtime_subdir}"
        self._folders.add(self._runtime_dir)
        setup = (f"mkdir -p {shlex.quote(self._runtime_dir)} && "
                 "{ python3 -c 'import flask' >/dev/null 2>&1 || python3 -m pip install -q flask 2>&1 || "
                 "python3 -m pip install -q --user --break-system-packages flask 2>&1; } && "
                 "python3 -c 'import flask'")
        command = f"sh -c {shlex.quote(setup)}"
        self.bytes_sent += len(command.encode())
        result = sandbox.process.exec(command, timeout=max(1, int(_left(deadline))))
        if result.exit_code != 0:
            raise SandboxStartError("could not make Flask importable in the Daytona sandbox (exit "
                                    f"{result.exit_code}): {(result.result or '')[-1500:]}")
        files = runtime_file_contents()
        sandbox.fs.upload_files([FileUpload(source=data, destination=f"{self._runtime_dir}/{name}")
                                 for name, data in files.items()])
        self.bytes_sent += sum(len(data) for data in files.values())

        argv = broker_command("python3", self._runtime_dir, spec, port=opts.broker_port, bind="0.0.0.0")
        line = f"cd {shlex.quote(self._runtime_dir)} && {shlex.join(argv)}"  # no exec: the session shell stays
        sandbox.process.create_session(BROKER_SESSION)
        self.bytes_sent += len(line.encode())
        started = sandbox.process.execute_session_command(
            BROKER_SESSION, SessionExecuteRequest(command=line, run_async=True))
        link = sandbox.get_preview_link(opts.broker_port)
        endpoint = BrokerEndpoint(url=str(link.url).rstrip("/"), inside_url=f"http://127.0.0.1:{opts.broker_port}",
                                  headers=preview_headers(getattr(link, "token", None)))
        self._wait_for_health(sandbox, endpoint, started.cmd_id, deadline)
        self._context = sandbox.code_interpreter.create_context(cwd=self._runtime_dir)
        log.info("daytona sandbox %s (%s) ready, broker at %s", spec.sandbox_id, sandbox.id, endpoint.url)
        return endpoint

    def _wait_for_health(self, sandbox: Any, endpoint: BrokerEndpoint, cmd_id: str, deadline: float) -> None:
        last, next_probe = "no answer yet", time.monotonic() + _PROBE_EVERY
        while True:
            try:
                request = urllib.request.Request(endpoint.url + PATH_HEALTH, headers=endpoint.headers)
                with urllib.request.urlopen(request, timeout=max(1.0, min(10.0, _left(deadline)))) as resp:
                    json.loads(resp.read() or b"{}")
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:  # URLError, timeouts, resets, a non-JSON page
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= next_probe:  # fail fast when the broker process already exited
                next_probe = time.monotonic() + _PROBE_EVERY
                command = sandbox.process.get_session_command(BROKER_SESSION, cmd_id)
                if command.exit_code is not None:
                    self.broker_log = self._broker_output(sandbox, cmd_id)
                    raise SandboxStartError(f"the broker exited with code {command.exit_code}: "
                                            f"{self.broker_log[-1500:]}")
            if _left(deadline) <= 0:
                self.broker_log = self._broker_output(sandbox, cmd_id)
                raise SandboxStartError(f"the broker did not answer /health through the preview link within "
                                        f"{self.options.boot_timeout:.0f}s (last: {last}); broker output: "
                                        f"{self.broker_log[-1500:] or '(none)'}")
            time.sleep(min(0.5, max(0.0, _left(deadline))))

    @staticmethod
    def _broker_output(sandbox: Any, cmd_id: str) -> str:
        try:
            logs = sandbox.process.get_session_command_logs(BROKER_SESSION, cmd_id)
            return (logs.output or f"{logs.stdout or ''}{logs.stderr or ''}").strip()
        except Exception as exc:  # diagnostics only
            return f"(broker output unavailable: {_message(exc)})"

    def _delete_half_created(self, client: Any, spec: SandboxSpec, exc: BaseException) -> None:
        """After a failed create, delete the sandbox if Daytona made one (never a conflicting one)."""
        from daytona import (DaytonaAuthenticationError, DaytonaConflictError, DaytonaForbiddenError,
                             DaytonaRateLimitError)

        if isinstance(exc, (DaytonaConflictError, DaytonaRateLimitError, DaytonaAuthenticationError,
                            DaytonaForbiddenError, SandboxError)):
            return  # nothing of ours exists (or the name belongs to someone else)
        sandbox_id = getattr(exc, "sandbox_id", None) or spec.sandbox_id
        try:
            sandbox = client.get(sandbox_id)
            if sandbox_id == spec.sandbox_id and (sandbox.labels or {}).get(SANDBOX_LABEL) != spec.sandbox_id:
                return
            _delete(sandbox)
        except Exception as cleanup:  # best effort: auto-stop + auto-delete catch what this misses
            if type(cleanup).__name__ != "DaytonaNotFoundError":
                log.warning("could not delete half-created sandbox %s: %s", sandbox_id, _message(cleanup))

    def destroy(self) -> None:
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
            sandbox, self._context = self._sandbox, None
        if sandbox is not None:  # deleting the sandbox also ends its contexts and the broker session
            _delete(sandbox)

    def keep_alive(self) -> None:
        """Reset Daytona's auto-stop timer (a long ``run_code`` is not activity by itself)."""
        sandbox = self._sandbox
        if sandbox is not None and not self._destroyed:
            try:
                sandbox.refresh_activity()
            except Exception as exc:  # advisory
                log.debug("refresh_activity failed for %s: %s", self.daytona_id, _message(exc))

    # -- work

    def _live(self) -> tuple[Any, Any]:
        with self._lock:
            if self._destroyed:
                raise SandboxDied("the Daytona sandbox was destroyed")
            if self._sandbox is None or self._context is None:
                raise SandboxDied("the Daytona sandbox is not booted")
            return self._sandbox, self._context

    def put_file(self, relative_path: str, data: bytes) -> None:
        from daytona import FileUpload

        parts = relative_path.replace("\\", "/").split("/")
        if not relative_path or relative_path.startswith("/") or ".." in parts or "" in parts:
            raise ValueError(f"not a relative path inside the runtime dir: {relative_path!r}")
        sandbox, _ = self._live()
        folder = "/".join([self.runtime_dir, *parts[:-1]])
        try:
            if folder not in self._folders:  # current daemons create parents on upload; older ones did not
                sandbox.fs.create_folder(folder, "755")
                self._folders.add(folder)
            sandbox.fs.upload_files([FileUpload(source=bytes(data), destination=f"{folder}/{parts[-1]}")])
        except Exception as exc:
            if _is_celery_time_limit(exc):
                raise
            raise describe_daytona_error(exc, during=f"uploading {relative_path}", booting=False) from exc
        self.bytes_sent += len(data)

    def run_code(self, code: str, timeout: float) -> None:
        """Run ``code`` in the context, once. The host enforces ``timeout`` (destroy, then
        ``SandboxTimeout``); the daemon gets ``timeout + run_grace`` as a backstop for a dead host."""
        sandbox, context = self._live()
        sid = self._spec.sandbox_id if self._spec else "?"
        output = OutputLog(sid)
        outcome: dict[str, Any] = {}
        self.last_execution_error = None

        def run() -> None:
            try:
                outcome["result"] = sandbox.code_interpreter.run_code(
                    code, context=context, timeout=max(1, math.ceil(timeout + self.options.run_grace)),
                    on_stdout=lambda msg: output.feed("stdout", msg.output),
                    on_stderr=lambda msg: output.feed("stderr", msg.output))
            except BaseException as exc:  # handed over to the caller's thread
                outcome["error"] = exc

        self.bytes_sent += len(code.encode())
        started = time.monotonic()
        worker = threading.Thread(target=run, name=f"daytona-run-{sid}", daemon=True)
        worker.start()
        auto_stop = self.options.auto_stop_interval
        activity_every = max(_ACTIVITY_EVERY_MIN, auto_stop * 60 * _ACTIVITY_FRACTION) if auto_stop > 0 else 0.0
        next_activity = started + activity_every
        while worker.is_alive():
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                break
            step = min(5.0, left, next_activity - time.monotonic()) if activity_every else min(5.0, left)
            worker.join(max(0.01, step))
            if activity_every and worker.is_alive() and time.monotonic() >= next_activity:
                self.keep_alive()
                next_activity = time.monotonic() + activity_every
        output.flush()
        elapsed = time.monotonic() - started
        if worker.is_alive():
            self.destroy()  # ends the run in the sandbox; a retry could run the code twice
            raise SandboxTimeout(f"code ran past {timeout:g}s; Daytona sandbox {sid} destroyed")
        error = outcome.get("error")
        if error is not None:
            from daytona import DaytonaConnectionError, DaytonaTimeoutError

            if not isinstance(error, Exception) or _is_celery_time_limit(error):
                raise error
            destroyed_meanwhile = self._destroyed
            self.destroy()
            if isinstance(error, DaytonaTimeoutError) and not isinstance(error, DaytonaConnectionError):
                raise SandboxTimeout(f"Daytona stopped the code after {elapsed:.0f}s (limit {timeout:g}s); "
                                     f"sandbox {sid} destroyed") from error
            if destroyed_meanwhile:
                raise SandboxDied(f"sandbox {sid} was destroyed while code was running") from error
            died = describe_daytona_error(error, during="running code", booting=False)
            tail = output.tail()
            raise type(died)(f"{died}" + (f"\nlast output:\n{tail[-1500:]}" if tail else "")) from error
        result = outcome.get("result")
        if getattr(result, "error", None) is not None:  # the driver itself raised: the context lives on
            self.last_execution_error = result.error
            log.error("sandbox %s: code raised %s: %s\n%s", sid, result.error.name, result.error.value,
                      result.error.traceback)


# ---------------------------------------------------------------- reaping

def _left(deadline: float) -> float:
    return deadline - time.monotonic()


def _delete(sandbox: Any, attempts: int = 3) -> bool:
    """Delete one sandbox; already gone counts as done. Retries transient errors (delete is idempotent)."""
    from daytona import DaytonaNotFoundError

    for attempt in range(attempts):
        try:
            sandbox.delete()
            return True
        except DaytonaNotFoundError:
            return True
        except Exception as exc:
            if _is_celery_time_limit(exc):
                raise
            if attempt == attempts - 1:
                log.error("could not delete Daytona sandbox %s: %s", getattr(sandbox, "id", "?"), _message(exc))
                return False
            time.sleep(0.5 * 2 ** attempt)
    return False


def reap_daytona_sandboxes(labels: dict[str, str], *, client: Any = None) -> int:
    """Delete every sandbox carrying all of ``labels``; return how many were deleted."""
    from daytona import ListSandboxesQuery

    if not labels:
        raise ValueError("refusing to reap without labels: that would delete every sandbox")
    wanted = {str(k): str(v) for k, v in labels.items()}
    client = client or daytona_client()
    found = list(client.list(ListSandboxesQuery(labels=wanted)))  # materialize before deleting
    deleted = 0
    for sandbox in found:
        have = sandbox.labels or {}
        if any(have.get(k) != v for k, v in wanted.items()):
            continue  # the server filter is trusted, but verified
        if str(getattr(sandbox, "state", "") or "").lower().endswith(("destroyed", "destroying")):
            continue
        deleted += _delete(sandbox)
    return deleted


def delete_daytona_sandbox(sandbox_id: str, *, client: Any = None) -> bool:
    """Delete the sandbox rlmq created for ``sandbox_id`` (its name and label); False if none."""
    from daytona import DaytonaNotFoundError

    client = client or daytona_client()
    try:
        sandbox = client.get(sandbox_id)
    except DaytonaNotFoundError:
        return reap_daytona_sandboxes({SANDBOX_LABEL: sandbox_id}, client=client) > 0
    if (sandbox.labels or {}).get(SANDBOX_LABEL) != sandbox_id:
        raise SandboxError(f"Daytona sandbox {sandbox_id!r} exists but was not created by rlmq; not deleting it")
    return _delete(sandbox)
