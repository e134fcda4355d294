"""Daytona sandboxes (SDK 0.226): one cloud sandbox per interpreter.

Boot: create a private sandbox named and labelled after the spec (no env vars, no secrets, a TTL),
upload the runtime files, make sure Flask is importable, start the broker in a background session,
and wait for its ``/health`` through the preview link (the host sends the link's token in
``X-Daytona-Preview-Token``). Code runs in one code-interpreter context, never retried: a retried
``run_code`` can run the code twice.

Every SDK call is bounded: boot steps share ``boot_timeout`` (each call gets what is left as its
timeout; the one call without a timeout parameter runs under a watchdog), later calls get
``api_timeout``. The host enforces each run's timeout (destroy, then ``SandboxTimeout``); activity
refreshes and deletions run off that clock, so a stalled API never holds a timeout back. The
daemon's own run timeout is a later backstop: the runtime catches the ``KeyboardInterrupt`` the
daemon would use.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shlex
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from broker_bridge.backends.base import (
    BackendName,
    BrokerEndpoint,
    Isolation,
    Sandbox,
    SandboxDied,
    SandboxError,
    SandboxInfo,
    SandboxSpec,
    SandboxStartError,
    SandboxTimeout,
    broker_command,
    runtime_file_contents,
)
from broker_bridge.backends.daytona.client import (
    call_within,
    daytona_client,
    describe_daytona_error,
    error_message,
    is_celery_time_limit,
    retry_after,
)
from broker_bridge.backends.daytona.options import (
    DEFAULT_TTL_MINUTES,
    SANDBOX_LABEL,
    DaytonaOptions,
    DaytonaResources,
    build_create_params,
    preview_headers,
    provider_of,
    sandbox_labels,
)
from broker_bridge.backends.daytona.output_log import OutputLog
from broker_bridge.backends.daytona.reap import LOOKUP_TIMEOUT, delete_sandbox
from broker_bridge.sandbox.protocol import PATH_HEALTH

if TYPE_CHECKING:
    import daytona
    from daytona_toolbox_api_client import InterpreterContext

__all__ = ["DaytonaSandbox"]

log = logging.getLogger("broker_bridge.backends.daytona")

BROKER_SESSION = "rlmq-broker"
_PROBE_EVERY = 3.0  # seconds between checks that the starting broker has not exited
_ACTIVITY_EVERY_MIN = 60.0  # during a long run_code, refresh_activity() at most this often ...
_ACTIVITY_FRACTION = 1 / 3  # ... and at least every third of the auto-stop interval
_CLEANUP_WAIT = 10.0  # seconds a failed boot or destroy() waits for a deletion before leaving it running
_UPLOAD_RATE = 1024 * 1024  # bytes per second an upload is allowed on top of api_timeout


class DaytonaSandbox(Sandbox):
    """One Daytona sandbox. ``destroy`` is safe from any thread; the rest is single-threaded."""

    kind = BackendName.DAYTONA

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_url: str | None = None,
        target: str | None = None,
        snapshot: str | None = None,
        image: str | None = None,
        resources: DaytonaResources | None = None,
        auto_stop_interval: int = 15,
        auto_delete_interval: int = 0,
        ephemeral: bool | None = None,
        ttl_minutes: int = DEFAULT_TTL_MINUTES,
        network_block_all: bool | None = None,
        boot_timeout: float = 180.0,
        api_timeout: float = 60.0,
        broker_port: int = 8765,
        run_grace: float = 30.0,
        runtime_subdir: str = "rlmq",
        client: daytona.Daytona | None = None,
    ) -> None:
        """Options as in ``DaytonaOptions`` (explicit here: the factory checks names against this
        signature). ``client``: a ``daytona.Daytona`` to use instead of this process's own."""
        super().__init__()
        self.options = DaytonaOptions(
            api_key=api_key, api_url=api_url, target=target, snapshot=snapshot, image=image,
            resources=resources, auto_stop_interval=auto_stop_interval,
            auto_delete_interval=auto_delete_interval, ephemeral=ephemeral, ttl_minutes=ttl_minutes,
            network_block_all=network_block_all, boot_timeout=boot_timeout, api_timeout=api_timeout,
            broker_port=broker_port, run_grace=run_grace)
        self._client = client  # tests and callers with their own client; else daytona_client()
        self._runtime_subdir = runtime_subdir
        self._runtime_dir: str | None = None
        self._spec: SandboxSpec | None = None
        self._sandbox: daytona.Sandbox | None = None
        self._context: InterpreterContext | None = None
        self._lock = threading.Lock()
        self._destroyed = False
        self._refreshing = False
        self._folders: set[str] = set()  # folders known to exist in the sandbox
        self.broker_log = ""  # the broker's output when it failed to come up
        self.last_execution_error: daytona.ExecutionError | None = None  # an exception that escaped the driver code itself

    # -- identity

    @property
    def runtime_dir(self) -> str:
        if self._runtime_dir is None:
            raise SandboxError("the Daytona sandbox has not been booted (runtime_dir is under its user's home)")
        return self._runtime_dir

    @property
    def daytona_id(self) -> str | None:
        return getattr(self._sandbox, "id", None)

    def planned_info(self, spec: SandboxSpec) -> SandboxInfo:
        return SandboxInfo(backend=self.kind, sandbox_id=spec.sandbox_id, labels=sandbox_labels(spec),
                           isolation=Isolation.VM, provider=provider_of(self.options))

    def info(self) -> SandboxInfo:
        if self._spec is None:
            raise RuntimeError("info() before boot()")
        return self.planned_info(self._spec)

    # -- lifecycle

    def boot(self, spec: SandboxSpec) -> BrokerEndpoint:
        if self._spec is not None:
            raise RuntimeError("a DaytonaSandbox boots once")
        self._spec = spec
        deadline = time.monotonic() + self.options.boot_timeout
        params = build_create_params(spec, self.options)
        client = self._client or daytona_client(self.options.api_key, self.options.api_url, self.options.target)
        sandbox = self._create(client, params, spec, deadline)
        with self._lock:
            self._sandbox = sandbox
            destroyed_meanwhile = self._destroyed
        if destroyed_meanwhile:  # destroy() ran in another thread while create was in flight
            _in_background(delete_sandbox, sandbox, wait=_CLEANUP_WAIT)
            raise SandboxStartError("the sandbox was destroyed while it was being created")
        try:
            return self._install_and_start(sandbox, spec, deadline)
        except BaseException as exc:
            destroyed_meanwhile = self._destroyed
            self.destroy()
            if not isinstance(exc, Exception) or is_celery_time_limit(exc):
                raise
            if destroyed_meanwhile and not isinstance(exc, SandboxError):
                raise SandboxStartError("the sandbox was destroyed while it was booting") from exc
            raise describe_daytona_error(exc, during="starting the broker") from exc

    def _budget(self, deadline: float, doing: str) -> float:
        """Seconds left of the boot for the next SDK call (at least 1: the SDK reads 0 as "no limit")."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise SandboxStartError(f"the Daytona sandbox did not boot within {self.options.boot_timeout:g}s "
                                    f"(the time ran out {doing})")
        return max(1.0, left)

    def _install_and_start(self, sandbox: daytona.Sandbox, spec: SandboxSpec, deadline: float) -> BrokerEndpoint:
        from daytona import FileUpload, SessionExecuteRequest

        opts = self.options

        def seconds(doing: str) -> int:  # the SDK's integer timeouts (it waits 5 s more for the daemon's reply)
            return max(1, int(self._budget(deadline, doing)))

        home = call_within(self._budget(deadline, "reading the home directory"), "get_user_home_dir",
                           sandbox.get_user_home_dir)
        self._runtime_dir = f"{(home or '/home/daytona').rstrip('/')}/{self._runtime_subdir}"
        self._folders.add(self._runtime_dir)
        setup = (f"mkdir -p {shlex.quote(self._runtime_dir)} && "
                 "{ python3 -c 'import flask' >/dev/null 2>&1 || python3 -m pip install -q flask 2>&1 || "
                 "python3 -m pip install -q --user --break-system-packages flask 2>&1; } && "
                 "python3 -c 'import flask'")
        command = f"sh -c {shlex.quote(setup)}"
        self.bytes_sent += len(command.encode())
        result = sandbox.process.exec(command, timeout=seconds("making Flask importable"))
        if result.exit_code != 0:
            raise SandboxStartError("could not make Flask importable in the Daytona sandbox (exit "
                                    f"{result.exit_code}): {(result.result or '')[-1500:]}")
        files = runtime_file_contents()
        sandbox.fs.upload_files([FileUpload(source=data, destination=f"{self._runtime_dir}/{name}")
                                 for name, data in files.items()], timeout=seconds("uploading the runtime"))
        self.bytes_sent += sum(len(data) for data in files.values())

        argv = broker_command("python3", self._runtime_dir, spec, port=opts.broker_port, bind="0.0.0.0")
        line = f"cd {shlex.quote(self._runtime_dir)} && {shlex.join(argv)}"  # no exec: the session shell stays
        sandbox.process.create_session(BROKER_SESSION, request_timeout=self._budget(deadline, "creating a session"))
        self.bytes_sent += len(line.encode())
        started = sandbox.process.execute_session_command(
            BROKER_SESSION, SessionExecuteRequest(command=line, run_async=True),
            timeout=seconds("starting the broker"))
        link = sandbox.get_preview_link(opts.broker_port,
                                        request_timeout=self._budget(deadline, "getting the preview link"))
        endpoint = BrokerEndpoint(url=str(link.url).rstrip("/"), inside_url=f"http://127.0.0.1:{opts.broker_port}",
                                  headers=preview_headers(getattr(link, "token", None)))
        self._wait_for_health(sandbox, endpoint, started.cmd_id, deadline)
        self._context = sandbox.code_interpreter.create_context(
            cwd=self._runtime_dir, request_timeout=self._budget(deadline, "creating the Python context"))
        log.info("daytona sandbox %s (%s) ready, broker at %s", spec.sandbox_id, sandbox.id, endpoint.url)
        return endpoint

    def _wait_for_health(self, sandbox: daytona.Sandbox, endpoint: BrokerEndpoint, cmd_id: str, deadline: float) -> None:
        last, next_probe = "no answer yet", time.monotonic() + _PROBE_EVERY
        while True:
            left = deadline - time.monotonic()
            try:
                request = urllib.request.Request(endpoint.url + PATH_HEALTH, headers=endpoint.headers)
                with urllib.request.urlopen(request, timeout=max(1.0, min(10.0, left))) as resp:
                    json.loads(resp.read() or b"{}")
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:  # URLError, timeouts, resets, a non-JSON page
                last = f"{type(exc).__name__}: {exc}"
            # the time is up: say what /health last answered (before a probe could run out of it)
            if deadline - time.monotonic() <= 0:
                self.broker_log = self._broker_output(sandbox, cmd_id)
                raise SandboxStartError(f"the broker did not answer /health through the preview link within "
                                        f"{self.options.boot_timeout:.0f}s (last: {last}); broker output: "
                                        f"{self.broker_log[-1500:] or '(none)'}")
            if time.monotonic() >= next_probe:  # fail fast when the broker process already exited
                next_probe = time.monotonic() + _PROBE_EVERY
                command = sandbox.process.get_session_command(
                    BROKER_SESSION, cmd_id, request_timeout=min(10.0, self._budget(deadline, "checking the broker")))
                if command.exit_code is not None:
                    self.broker_log = self._broker_output(sandbox, cmd_id)
                    raise SandboxStartError(f"the broker exited with code {command.exit_code}: "
                                            f"{self.broker_log[-1500:]}")
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _create(self, client: daytona.Daytona, params: Any, spec: SandboxSpec, deadline: float) -> daytona.Sandbox:
        """``create``, asked again after a passing refusal (a 429, a busy gateway) while the boot's time
        allows: a fleet starting many runs at once meets the API's rate limit, and a run should wait its
        turn, not fail. A lasting refusal (a quota, a bad key) fails at once."""
        for attempt in itertools.count():
            try:
                return client.create(params, timeout=self._budget(deadline, "creating the sandbox"))
            except BaseException as exc:
                self._delete_half_created(client, spec, exc)
                if not isinstance(exc, Exception) or is_celery_time_limit(exc):
                    raise
                wait = retry_after(exc, attempt)
                if wait is None or time.monotonic() + wait + 1.0 >= deadline:
                    raise describe_daytona_error(exc) from exc
                log.warning("Daytona refused the create for now (%s); asking again in %.1fs", error_message(exc), wait)
            until = time.monotonic() + wait
            while time.monotonic() < until:  # a destroy (a cancel) need not wait out the pause
                if self._destroyed:
                    raise SandboxStartError("the sandbox was destroyed while it was being created")
                time.sleep(min(0.2, max(0.0, until - time.monotonic())))
        raise AssertionError("unreachable")

    @staticmethod
    def _broker_output(sandbox: daytona.Sandbox, cmd_id: str) -> str:
        try:
            logs = sandbox.process.get_session_command_logs(BROKER_SESSION, cmd_id, request_timeout=10.0)
            return (logs.output or f"{logs.stdout or ''}{logs.stderr or ''}").strip()
        except Exception as exc:  # diagnostics only
            return f"(broker output unavailable: {error_message(exc)})"

    def _delete_half_created(self, client: daytona.Daytona, spec: SandboxSpec, exc: BaseException) -> None:
        """After a failed create, delete the sandbox if Daytona made one (never a conflicting one).
        A create whose reply was lost made one: it is found by its name and our label."""
        from daytona import (
            DaytonaAuthenticationError,
            DaytonaConflictError,
            DaytonaForbiddenError,
            DaytonaRateLimitError,
        )

        if isinstance(exc, (DaytonaConflictError, DaytonaRateLimitError, DaytonaAuthenticationError,
                            DaytonaForbiddenError, SandboxError)):
            return  # nothing of ours exists (or the name belongs to someone else)
        sandbox_id = getattr(exc, "sandbox_id", None) or spec.sandbox_id

        def cleanup() -> None:
            try:
                sandbox = client.get(sandbox_id, request_timeout=LOOKUP_TIMEOUT)
                if sandbox_id == spec.sandbox_id and (sandbox.labels or {}).get(SANDBOX_LABEL) != spec.sandbox_id:
                    return
                delete_sandbox(sandbox)
            except Exception as cleanup_error:  # best effort: the TTL, auto-stop and label reapers catch the rest
                if type(cleanup_error).__name__ != "DaytonaNotFoundError":
                    log.warning("could not delete half-created sandbox %s: %s", sandbox_id,
                                error_message(cleanup_error))

        _in_background(cleanup, wait=_CLEANUP_WAIT)

    def destroy(self) -> None:
        """Delete the sandbox: waits up to ``_CLEANUP_WAIT`` seconds, then lets the deletion go on in
        the background (a stalled API must not hold a timeout or a shutdown back)."""
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
            sandbox, self._context = self._sandbox, None
        if sandbox is not None:  # deleting the sandbox also ends its contexts and the broker session
            _in_background(delete_sandbox, sandbox, wait=_CLEANUP_WAIT)

    def keep_alive(self) -> None:
        """Reset Daytona's auto-stop timer (a long ``run_code`` is not activity by itself). In the
        background, one refresh at a time: a stalled API never delays the caller."""
        sandbox = self._sandbox
        with self._lock:
            if sandbox is None or self._destroyed or self._refreshing:
                return
            self._refreshing = True

        def refresh() -> None:
            try:
                sandbox.refresh_activity(request_timeout=min(self.options.api_timeout, 30.0))
            except Exception as exc:  # advisory
                log.debug("refresh_activity failed for %s: %s", getattr(sandbox, "id", "?"), error_message(exc))
            finally:
                self._refreshing = False

        threading.Thread(target=refresh, name="rlmq-daytona-activity", daemon=True).start()

    # -- work

    def _live(self) -> tuple[daytona.Sandbox, InterpreterContext]:
        with self._lock:
            if self._destroyed:
                raise SandboxDied("the Daytona sandbox was destroyed")
            if self._sandbox is None or self._context is None:
                raise SandboxDied("the Daytona sandbox is not booted")
            return self._sandbox, self._context

    def put_file(self, relative_path: str, data: bytes | bytearray) -> None:
        from daytona import FileUpload

        parts = relative_path.replace("\\", "/").split("/")
        if not relative_path or relative_path.startswith("/") or ".." in parts or "" in parts:
            raise ValueError(f"not a relative path inside the runtime dir: {relative_path!r}")
        sandbox, _ = self._live()
        folder = "/".join([self.runtime_dir, *parts[:-1]])
        timeout = self.options.api_timeout
        try:
            if folder not in self._folders:  # current daemons create parents on upload; older ones did not
                sandbox.fs.create_folder(folder, "755", request_timeout=timeout)
                self._folders.add(folder)
            sandbox.fs.upload_files([FileUpload(source=bytes(data), destination=f"{folder}/{parts[-1]}")],
                                    timeout=max(1, math.ceil(timeout + len(data) / _UPLOAD_RATE)))
        except Exception as exc:
            if is_celery_time_limit(exc):
                raise
            raise describe_daytona_error(exc, during=f"uploading {relative_path}", booting=False) from exc
        self.bytes_sent += len(data)

    def run_code(self, code: str, timeout: float) -> None:
        """Run ``code`` in the context, once. The host enforces ``timeout`` (destroy, then
        ``SandboxTimeout``); the daemon gets ``timeout + run_grace`` as a backstop for a dead host.
        Code that raises past the runtime (a broken driver or bootstrap) is a ``SandboxError``."""
        sandbox, context = self._live()
        sid = self._spec.sandbox_id if self._spec else "?"
        output = OutputLog(sid)
        returned: list[daytona.ExecutionResult] = []
        raised: list[BaseException] = []
        self.last_execution_error = None

        def run() -> None:
            try:
                returned.append(sandbox.code_interpreter.run_code(
                    code, context=context, timeout=max(1, math.ceil(timeout + self.options.run_grace)),
                    on_stdout=lambda msg: output.feed("stdout", msg.output),
                    on_stderr=lambda msg: output.feed("stderr", msg.output)))
            except BaseException as exc:  # handed over to the caller's thread
                raised.append(exc)

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
                self.keep_alive()  # returns at once: the refresh runs on its own thread
                next_activity = time.monotonic() + activity_every
        output.flush()
        elapsed = time.monotonic() - started
        if worker.is_alive():
            self.destroy()  # ends the run in the sandbox; a retry could run the code twice
            raise SandboxTimeout(f"code ran past {timeout:g}s; Daytona sandbox {sid} destroyed")
        if raised:
            self._raise_run_error(raised[0], elapsed, timeout, sid, output)
        failure = returned[0].error
        if failure is not None:  # raised past the runtime: the runtime or the bootstrap is broken
            self.last_execution_error = failure
            trace = (getattr(failure, "traceback", "") or "").strip()
            raise SandboxError(f"the sandbox runtime failed: {failure.name}: {failure.value}"
                               + (f"\n{trace[-1500:]}" if trace else ""))

    def _raise_run_error(self, error: BaseException, elapsed: float, timeout: float, sid: str,
                         output: OutputLog) -> NoReturn:
        from daytona import DaytonaConnectionError, DaytonaTimeoutError

        if not isinstance(error, Exception) or is_celery_time_limit(error):
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


def _in_background(work: Callable[..., Any], *args: Any, wait: float) -> None:
    """Run ``work`` on a daemon thread and wait for it at most ``wait`` seconds."""
    thread = threading.Thread(target=work, args=args, name="rlmq-daytona-cleanup", daemon=True)
    thread.start()
    thread.join(wait)
    if thread.is_alive():
        log.warning("a Daytona deletion is taking more than %.0fs; it goes on in the background (the sandbox's "
                    "TTL and the run's label reaper remove it if it fails)", wait)
