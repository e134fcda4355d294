"""The Daytona backend against the Daytona emulator (tests/support/daytona_emulator), through the real
SDK: boot, runs, timeouts, faults, reaping. No doubles: each sandbox is a real one on this machine.
Error mapping, create params and output logging are checked on their own; one test runs against
Daytona's cloud when ``DAYTONA_API_KEY`` is set (marker ``live``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

daytona = pytest.importorskip("daytona")
from daytona import (  # noqa: E402
    CreateSandboxFromImageParams,
    CreateSandboxFromSnapshotParams,
    DaytonaError,
    DaytonaNotFoundError,
    DaytonaTimeoutError,
)
from daytona._sync.code_interpreter import CodeInterpreter  # noqa: E402
from daytona._utils.errors import create_daytona_error  # noqa: E402

from broker_bridge import SandboxInterpreter, destroy_sandbox, reap_labelled  # noqa: E402
from broker_bridge.backends.base import (  # noqa: E402
    RUNTIME_FILES,
    SANDBOX_SOURCE_DIR,
    SandboxCapacityError,
    SandboxDied,
    SandboxError,
    SandboxSpec,
    SandboxStartError,
    SandboxTimeout,
    runtime_file_contents,
)
from broker_bridge.backends.daytona import (  # noqa: E402
    DEFAULT_TTL_MINUTES,
    PREVIEW_TOKEN_HEADER,
    DaytonaOptions,
    DaytonaSandbox,
    OutputLog,
    build_create_params,
    delete_daytona_sandbox,
    describe_daytona_error,
    preview_headers,
    reap_daytona_sandboxes,
)
from broker_bridge.backends.daytona import client as dclient  # noqa: E402
from broker_bridge.backends.daytona import sandbox as dsandbox  # noqa: E402
from broker_bridge.backends.daytona.options import check_no_secrets  # noqa: E402
from broker_bridge.sandbox.protocol import KEEPALIVE_MARKER, PATH_HEALTH, token_digest  # noqa: E402
from tests.support.daytona_emulator.harness import running_emulator  # noqa: E402
from tests.support.sandboxes import needs_namespaces  # noqa: E402

SPEC = SandboxSpec(
    sandbox_id="rlmq-0123456789abcdef",
    host_token_sha256="ab" * 32,
    sandbox_token="sandbox-token-not-for-labels",
    labels={"rlmq.run": "run-1"},
)


def on_emulator(test):
    """An emulator process and real sandboxes: slow, and only where namespaces work."""
    return pytest.mark.slow(needs_namespaces(test))


def new_spec(**labels: str) -> SandboxSpec:
    sandbox_id = f"rlmq-{uuid.uuid4().hex[:16]}"
    return SandboxSpec(sandbox_id=sandbox_id, host_token_sha256="ab" * 32, sandbox_token=secrets.token_urlsafe(16),
                       labels={"rlmq.sandbox": sandbox_id, **labels})


def remaining(emulator) -> list[str]:
    return [s["name"] for s in emulator.sandboxes()]


def gone(emulator, within: float = 15.0) -> bool:
    """No sandbox left on the emulator (deletions may finish on a background thread)."""
    deadline = time.monotonic() + within
    while remaining(emulator) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not remaining(emulator)


@pytest.fixture
def booted(daytona_env):
    """A booted DaytonaSandbox on the emulator, and the emulator; destroyed afterwards."""
    backends = []

    def boot(spec: SandboxSpec | None = None, **options):
        backend = DaytonaSandbox(**options)
        backends.append(backend)
        return backend, backend.boot(spec or new_spec())

    yield boot
    for backend in backends:
        backend.destroy()


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ------------------------------------------------------------------ error mapping (SDK instances)

def _close_error(code: int, reason: str) -> DaytonaError:
    """The exception the SDK's code-interpreter client raises for a daemon websocket close."""
    try:
        CodeInterpreter._maybe_raise_from_close(None, code, reason)  # type: ignore[arg-type]  # the SDK method never uses self
    except DaytonaError as exc:
        return exc
    raise AssertionError(f"close code {code} raised nothing")


def _sdk_error(message: str, status: int, during: str, expected: type[SandboxError], words: list[str],
               **details: Any) -> tuple[DaytonaError, str, type[SandboxError], list[str]]:
    """A case for the test below: the SDK's error for an API answer with ``status``, raised ``during``."""
    return create_daytona_error(message, status_code=status, **details), during, expected, words


CREATING = "creating the sandbox"


@pytest.mark.parametrize(
    "exc, during, expected, words",
    [
        _sdk_error("Too many requests", 429, CREATING, SandboxCapacityError, ["rate limit", "retry later", "7"],
                   headers={"Retry-After": "7"}),
        _sdk_error("Total CPU limit exceeded. Maximum allowed: 10.\nUpgrade your tier", 403, CREATING,
                   SandboxCapacityError, ["quota", "Total CPU limit exceeded"]),
        _sdk_error("Total disk limit exceeded. Maximum allowed: 30GiB.", 400, CREATING, SandboxCapacityError, ["quota"]),
        _sdk_error("No available runners", 400, CREATING, SandboxCapacityError, ["No available runners"]),
        _sdk_error("CPU request 8 exceeds maximum allowed per sandbox (4).", 403, CREATING, SandboxStartError,
                   ["per-sandbox limit"]),
        _sdk_error("Invalid API key", 401, CREATING, SandboxStartError, ["rejected the API key", "DAYTONA_API_KEY"]),
        _sdk_error("Organization is suspended", 403, CREATING, SandboxStartError, ["403", "suspended"]),
        _sdk_error("Snapshot nope not found. Did you add it?", 400, CREATING, SandboxStartError,
                   ["Snapshot nope not found"]),
        _sdk_error("Sandbox with name rlmq-x already exists", 409, CREATING, SandboxStartError, ["already exists"]),
        _sdk_error("Service unavailable", 503, CREATING, SandboxCapacityError, ["retry later"]),
        _sdk_error("Sandbox not found", 404, "starting the broker", SandboxStartError, ["not found"]),
        _sdk_error("Sandbox not found", 404, "running code", SandboxDied, ["gone"]),
        _sdk_error("Sandbox is not running", 400, "running code", SandboxDied, ["stopped"], code="SANDBOX_NOT_RUNNING",
                   source="DAYTONA_PROXY"),
        (_close_error(1008, "context not found: ctx-1"), "running code", SandboxDied, ["context not found"]),
        (_close_error(1001, "worker process ended"), "running code", SandboxDied, ["worker process ended"]),
    ],
)
def test_describe_daytona_error_maps_real_sdk_errors(exc, during, expected, words):
    mapped = describe_daytona_error(exc, during=during)
    assert type(mapped) is expected
    for word in words:
        assert word.lower() in str(mapped).lower()


def test_describe_daytona_error_defaults_and_passthrough():
    assert isinstance(describe_daytona_error(create_daytona_error("x", status_code=429)), SandboxCapacityError)
    own = SandboxDied("already ours")
    assert describe_daytona_error(own) is own
    assert isinstance(_close_error(4008, ""), DaytonaTimeoutError)  # what run_code turns into SandboxTimeout


# ------------------------------------------------------------------ options, create params, client

def test_constructor_takes_every_option_by_name():
    import inspect

    from broker_bridge.factory import interpreter_factory

    accepted = set(inspect.signature(DaytonaSandbox.__init__).parameters) - {"self"}
    assert {f.name for f in dataclasses.fields(DaytonaOptions)} <= accepted
    backend = DaytonaSandbox(auto_stop_interval=5, snapshot="snap", boot_timeout=10, api_timeout=3)
    assert (backend.options.auto_stop_interval, backend.options.snapshot, backend.options.api_timeout) == (5, "snap", 3)
    interpreter_factory("daytona", auto_stop_interval=5, api_url="http://x", on_sandbox_creating=print)
    with pytest.raises(TypeError):
        interpreter_factory("daytona", auto_stop=5)
    assert "secret" not in repr(DaytonaOptions(api_key="secret"))


def test_create_params_are_labelled_named_private_capped_and_carry_no_env():
    params = build_create_params(SPEC, DaytonaOptions())
    assert isinstance(params, CreateSandboxFromSnapshotParams)
    assert params.name == SPEC.sandbox_id
    assert params.labels == {"rlmq.run": "run-1", "rlmq.sandbox": SPEC.sandbox_id}
    assert params.auto_stop_interval == 15
    assert params.auto_delete_interval == 0  # SDK: 0 = delete as soon as it stops
    assert params.ttl_minutes == DEFAULT_TTL_MINUTES > 6 * 60  # outlives rlmq's default run limit, nothing more
    assert params.public is False
    assert params.env_vars is None and params.secrets is None
    assert params.language == "python"
    assert params.snapshot is None


def test_create_params_options():
    params = build_create_params(SPEC, DaytonaOptions(snapshot="snap", auto_stop_interval=5,
                                                      auto_delete_interval=-1, target="eu", ttl_minutes=90))
    assert isinstance(params, CreateSandboxFromSnapshotParams)
    assert (params.snapshot, params.auto_stop_interval, params.auto_delete_interval) == ("snap", 5, -1)
    assert (params.target, params.ttl_minutes) == ("eu", 90)
    assert build_create_params(SPEC, DaytonaOptions(ephemeral=True)).auto_delete_interval == 0
    assert build_create_params(SPEC, DaytonaOptions(ttl_minutes=0)).ttl_minutes == 0  # explicitly off
    image = build_create_params(SPEC, DaytonaOptions(image="python:3.12-slim", resources={"cpu": 2, "memory": 4}))
    assert isinstance(image, CreateSandboxFromImageParams) and image.resources is not None
    assert (image.resources.cpu, image.resources.memory) == (2, 4)
    for bad in ({"snapshot": "a", "image": "b"}, {"resources": {"cpu": 1}}, {"ephemeral": True, "auto_delete_interval": 5},
                {"ttl_minutes": -1}, {"boot_timeout": 0}, {"api_timeout": -1}):
        with pytest.raises(ValueError):
            DaytonaOptions(**bad)


@pytest.mark.parametrize(
    "labels",
    [{"my_api_key": "x"}, {"rlmq.token": "x"}, {"rlmq.note": SPEC.sandbox_token}, {"rlmq.note": "daytona-key-123"}],
)
def test_create_params_refuse_secrets(monkeypatch, labels):
    monkeypatch.setenv("DAYTONA_API_KEY", "daytona-key-123")
    spec = SandboxSpec(SPEC.sandbox_id, SPEC.host_token_sha256, SPEC.sandbox_token, labels=labels)
    with pytest.raises(SandboxStartError, match="refusing"):
        build_create_params(spec, DaytonaOptions())


def test_secret_check_covers_env_and_secrets():
    params = build_create_params(SPEC, DaytonaOptions())
    params.env_vars = {"OPENAI_API_KEY": "sk-..."}
    with pytest.raises(SandboxStartError, match="environment"):
        check_no_secrets(params, SPEC)


def test_missing_api_key_fails_at_boot_and_creates_nothing(monkeypatch):
    monkeypatch.delenv("DAYTONA_API_KEY", raising=False)
    monkeypatch.setattr(daytona, "Daytona", lambda *a, **k: pytest.fail("a client was constructed"))
    dclient.forget_clients()
    backend = DaytonaSandbox()  # constructing reads nothing
    with pytest.raises(SandboxStartError, match="DAYTONA_API_KEY is not set"):
        backend.boot(SPEC)
    assert not dclient._clients
    backend.destroy()  # nothing to do, no error


def test_preview_header_is_the_one_the_sdk_documents():
    assert preview_headers("tok") == {"X-Daytona-Preview-Token": "tok", "X-Daytona-Skip-Preview-Warning": "true"}
    assert PREVIEW_TOKEN_HEADER in daytona.Sandbox.get_preview_link.__doc__
    assert PREVIEW_TOKEN_HEADER not in preview_headers("")


def test_call_within_bounds_a_call_that_takes_no_timeout():
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(DaytonaTimeoutError, match="get_user_home_dir within 0s"):
        dclient.call_within(0.3, "get_user_home_dir", release.wait, 30)
    assert time.monotonic() - started < 2
    release.set()
    assert dclient.call_within(5, "echo", lambda x: x, 7) == 7
    with pytest.raises(KeyError):
        dclient.call_within(5, "fails", {}.__getitem__, "missing")


def test_output_log_drops_keepalive_lines_even_when_split(caplog):
    caplog.set_level(logging.DEBUG, logger="broker_bridge.backends.daytona")
    out = OutputLog("sb")
    out.feed("stdout", "hello\n" + KEEPALIVE_MARKER[:4])
    out.feed("stdout", KEEPALIVE_MARKER[4:] + "\n" + KEEPALIVE_MARKER + "\npartial")
    out.feed("stdout", " line" + KEEPALIVE_MARKER + "\n")
    out.feed("stderr", "warn")
    out.flush()
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["[sb stdout] hello", "[sb stdout] partial line", "[sb stderr] warn"]
    assert "keep-alive" not in out.tail() and "partial line" in out.tail()


def test_output_log_bounds_long_lines_and_tail():
    out = OutputLog("sb", tail_chars=100, max_line=10)
    out.feed("stdout", "x" * 35)
    assert out._partial["stdout"] == "x" * 5
    out.feed("stdout", "\n" + "\n".join(f"line {i}" for i in range(100)) + "\n")
    assert len(out.tail()) < 120 and out.tail().endswith("line 99")


# ------------------------------------------------------------------ the client, on the emulator

@pytest.mark.slow
def test_client_is_cached_per_process_and_forgotten_in_a_fork(daytona_env):
    first = dclient.daytona_client()
    assert dclient.daytona_client() is first
    assert dclient.daytona_client(api_url=daytona_env.api_url) is not first  # other settings, other client
    pid = os.fork()
    if pid == 0:  # child: the parent's clients are forgotten, a new one is made on demand
        ok = not dclient._clients and dclient.daytona_client() is not first
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ------------------------------------------------------------------ boot

@on_emulator
def test_boot_installs_runtime_starts_broker_and_waits_for_health(booted, daytona_env):
    backend, endpoint = booted(new_spec(**{"rlmq.run": "run-1"}), broker_port=8765)
    sandbox = backend._sandbox
    assert backend.runtime_dir == "/home/daytona/rlmq"
    for name in RUNTIME_FILES:
        assert sandbox.fs.download_file(f"{backend.runtime_dir}/{name}") == (SANDBOX_SOURCE_DIR / name).read_bytes()
    link = sandbox.get_preview_link(8765)
    assert endpoint.url == link.url.rstrip("/") and endpoint.inside_url == "http://127.0.0.1:8765"
    assert endpoint.headers == {PREVIEW_TOKEN_HEADER: link.token, "X-Daytona-Skip-Preview-Warning": "true"}
    status, body = http_get(endpoint.url + PATH_HEALTH, endpoint.headers)
    assert status == 200 and isinstance(json.loads(body), dict)
    assert http_get(endpoint.url + PATH_HEALTH)[0] == 401  # no token, no way in

    (command,) = sandbox.process.get_session(dsandbox.BROKER_SESSION).commands
    assert "--bind 0.0.0.0" in command.command and "--port 8765" in command.command
    assert command.exit_code is None  # started with runAsync, still running
    spec = backend._spec
    assert token_digest(spec.sandbox_token) in command.command and spec.sandbox_token not in command.command
    assert backend._context.cwd == backend.runtime_dir
    runtime_bytes = sum((SANDBOX_SOURCE_DIR / name).stat().st_size for name in RUNTIME_FILES)
    assert runtime_bytes < backend.bytes_sent < runtime_bytes + 2000
    created = daytona_env.client().get(spec.sandbox_id)
    assert created.labels == {**spec.labels, "rlmq.run": "run-1", "code-toolbox-language": "python"}
    assert (created.public, created.auto_stop_interval, created.auto_delete_interval) == (False, 15, 0)
    assert created.auto_destroy_at is not None  # the default TTL
    assert daytona_env.api_key not in sandbox.process.exec("env").result  # no key inside

    before = backend.bytes_sent
    backend.put_file("inputs/abc123", b"war and peace")
    assert sandbox.fs.download_file(f"{backend.runtime_dir}/inputs/abc123") == b"war and peace"
    assert backend.bytes_sent == before + len(b"war and peace")
    for bad in ("../escape", "/etc/passwd", "inputs//x", ""):
        with pytest.raises(ValueError):
            backend.put_file(bad, b"")

    info = backend.info()
    assert (info.backend, info.sandbox_id, info.isolation) == ("daytona", spec.sandbox_id, "vm")
    assert info.labels == {**spec.labels, "rlmq.run": "run-1"} and info.provider == {"api_url": daytona_env.api_url}
    backend.destroy()
    assert gone(daytona_env)
    backend.destroy()  # idempotent
    with pytest.raises(SandboxDied):
        backend.put_file("late", b"x")


@on_emulator
def test_a_sandbox_built_from_an_image_boots_and_runs(booted, daytona_env):
    """``image=`` (with resources) goes through the SDK's image create (``CreateSandboxFromImageParams``,
    a build the emulator makes from its Python snapshot) and boots as a snapshot's sandbox does."""
    backend, endpoint = booted(image="python:3.12-slim", resources={"cpu": 2, "memory": 4})
    (listed,) = daytona_env.sandboxes()
    assert (listed["cpu"], listed["memory"], listed["state"]) == (2, 4, "started")  # sizes only an image may set
    assert http_get(endpoint.url + PATH_HEALTH, endpoint.headers)[0] == 200
    backend.run_code("print('built')", timeout=30)


@on_emulator
def test_boot_fails_fast_when_the_broker_exits_and_deletes_the_sandbox(daytona_env, monkeypatch):
    monkeypatch.setattr(dsandbox, "_PROBE_EVERY", 0.2)
    monkeypatch.setattr(dsandbox, "runtime_file_contents", lambda: {
        "broker.py": b"import sys\nprint('broker exploded')\nsys.exit(3)\n", "protocol.py": b"", "runtime.py": b""})
    backend = DaytonaSandbox(boot_timeout=30)
    started = time.monotonic()
    with pytest.raises(SandboxStartError, match=r"exited with code 3.*broker exploded"):
        backend.boot(new_spec())
    assert time.monotonic() - started < 10
    assert "broker exploded" in backend.broker_log and gone(daytona_env)


@on_emulator
def test_boot_times_out_when_health_never_answers(daytona_env, monkeypatch):
    monkeypatch.setattr(dsandbox, "runtime_file_contents", lambda: {
        "broker.py": b"import time\ntime.sleep(60)\n", "protocol.py": b"", "runtime.py": b""})
    # 10 s: creating takes ~0.2 s on a quiet box but several seconds under load, and the health wait
    # must still be what the time runs out on
    with pytest.raises(SandboxStartError, match=r"did not answer /health.*HTTP 502"):
        DaytonaSandbox(boot_timeout=10).boot(new_spec())
    assert gone(daytona_env)


@on_emulator
def test_boot_fails_clearly_without_flask_and_deletes_the_sandbox(daytona_env):
    with pytest.raises(SandboxStartError, match="could not make Flask importable"):
        DaytonaSandbox(snapshot="daytona-bare").boot(new_spec())  # stdlib only, and no network to pip from
    assert gone(daytona_env)


@on_emulator
def test_a_create_that_outlasts_the_boot_deletes_the_sandbox_daytona_made(daytona_env):
    daytona_env.clock(create_delay=6)
    started = time.monotonic()
    with pytest.raises(SandboxStartError, match="timed out"):
        DaytonaSandbox(boot_timeout=2).boot(new_spec())
    assert time.monotonic() - started < 2 + 12  # the boot's bound plus the cleanup's wait
    daytona_env.clock(create_delay=0)
    assert gone(daytona_env)


@on_emulator
def test_a_lost_create_reply_deletes_our_sandbox_but_a_conflict_leaves_theirs(daytona_env):
    daytona_env.faults(lose_create=1)
    with pytest.raises(SandboxStartError):
        DaytonaSandbox().boot(new_spec())
    assert gone(daytona_env)  # found by its name and label, and deleted

    spec = new_spec()
    theirs = daytona_env.client().create(CreateSandboxFromSnapshotParams(name=spec.sandbox_id, labels={"team": "x"}))
    with pytest.raises(SandboxStartError, match="already exists"):
        DaytonaSandbox().boot(spec)
    assert remaining(daytona_env) == [theirs.name]


@pytest.mark.parametrize("status, message, expected", [
    (403, "Total memory limit exceeded. Maximum allowed: 20GiB.", SandboxCapacityError),
    (429, "ThrottlerException: Too Many Requests", SandboxCapacityError),
    (503, "Service unavailable", SandboxCapacityError),
    (500, "Internal server error", SandboxStartError),
    pytest.param(0, "", SandboxStartError, id="api-key"),
])
@on_emulator
def test_create_errors_map_to_sandbox_errors_and_leave_nothing(daytona_env, monkeypatch, status, message, expected):
    # a refusal that lasts: passing ones (429, 503) are asked again until the boot's time runs out
    if status:
        daytona_env.faults(fail=[{"scope": "api", "status": status, "count": 100, "method": "POST",
                                  "path": "/api/sandbox", "message": message}])
    else:
        monkeypatch.setenv("DAYTONA_API_KEY", "not-the-key")
    with pytest.raises(expected) as caught:
        DaytonaSandbox(boot_timeout=4).boot(new_spec())
    assert type(caught.value) is expected
    assert gone(daytona_env)
    if status == 429:
        assert "Retry-After: 1" in str(caught.value)


@pytest.mark.parametrize("status", [429, 503])
@on_emulator
def test_a_passing_refusal_of_the_create_is_asked_again(daytona_env, status):
    """A fleet starting many runs meets the API's rate limit: the create waits its turn (Retry-After, or a
    short backoff) within the boot's time instead of failing the run; only one sandbox is made."""
    daytona_env.faults(fail=[{"scope": "api", "status": status, "count": 2, "method": "POST", "path": "/api/sandbox",
                              "message": "ThrottlerException: Too Many Requests" if status == 429 else "busy"}])
    backend = DaytonaSandbox(boot_timeout=60)
    started = time.monotonic()
    backend.boot(new_spec())
    try:
        assert daytona_env.requests().get("api POST /api/sandbox", 0) == 3
        assert 2.0 <= time.monotonic() - started < 30  # two pauses of at least a second each
        assert len(remaining(daytona_env)) == 1
    finally:
        backend.destroy()
    assert gone(daytona_env)


@on_emulator
def test_a_hung_toolbox_cannot_hold_the_boot_past_its_timeout(daytona_env, monkeypatch):
    """The first toolbox call of the boot (get_user_home_dir) takes no timeout: the watchdog bounds it."""
    monkeypatch.setattr(dsandbox, "_CLEANUP_WAIT", 1.0)
    daytona_env.faults(hang=["toolbox"])
    started = time.monotonic()
    with pytest.raises(SandboxStartError, match="get_user_home_dir"):
        DaytonaSandbox(boot_timeout=3).boot(new_spec())
    assert time.monotonic() - started < 3 + 1 + 4  # the boot's bound, the cleanup's wait, slack for a busy box
    daytona_env.clear_faults()
    assert gone(daytona_env)


@on_emulator
def test_a_slow_toolbox_step_cannot_hold_the_boot_past_its_timeout(daytona_env, monkeypatch):
    """Later steps get what is left of boot_timeout as their own timeout."""
    monkeypatch.setattr(dsandbox, "_CLEANUP_WAIT", 1.0)
    daytona_env.faults(latency={"toolbox": 1.5})
    started = time.monotonic()
    with pytest.raises(SandboxStartError, match=r"boot within 4s|timed out|did not answer"):
        DaytonaSandbox(boot_timeout=4).boot(new_spec())
    assert time.monotonic() - started < 4 + 1.5 + 1 + 3
    daytona_env.clear_faults()
    assert gone(daytona_env)


# ------------------------------------------------------------------ run_code

@on_emulator
def test_run_code_streams_output_without_keepalives(booted, caplog):
    caplog.set_level(logging.DEBUG, logger="broker_bridge.backends.daytona")
    backend, _ = booted()
    before = backend.bytes_sent
    code = (f"import sys\nprint('step 1')\nprint({KEEPALIVE_MARKER!r})\nsys.stdout.write({KEEPALIVE_MARKER[:5]!r})\n"
            f"sys.stdout.write({KEEPALIVE_MARKER[5:]!r} + '\\n')\nprint('careful', file=sys.stderr)")
    assert backend.run_code(code, timeout=20) is None
    assert backend.bytes_sent == before + len(code)
    sid = backend._spec.sandbox_id
    logged = [r.getMessage() for r in caplog.records if r.name == "broker_bridge.backends.daytona"]
    assert f"[{sid} stdout] step 1" in logged and f"[{sid} stderr] careful" in logged
    assert not any("keep-alive" in line for line in logged)


@on_emulator
def test_code_that_raises_past_the_runtime_is_a_sandbox_error(booted):
    backend, _ = booted()
    backend.run_code("x = 1", timeout=20)
    with pytest.raises(SandboxError, match="the sandbox runtime failed: NameError: name 'rt' is not defined"):
        backend.run_code("rt.execute()", timeout=20)
    assert backend.last_execution_error.name == "NameError"


@on_emulator
def test_a_broken_bootstrap_fails_the_start_with_its_cause(daytona_env, monkeypatch):
    files = runtime_file_contents()
    monkeypatch.setattr(dsandbox, "runtime_file_contents", lambda: {
        **files, "runtime.py": b"raise RuntimeError('bootstrap exploded')\n"})
    interpreter = SandboxInterpreter(DaytonaSandbox)
    with pytest.raises(SandboxError, match="RuntimeError: bootstrap exploded") as caught:
        interpreter.execute("print(1)")
    assert "without reporting an outcome" not in str(caught.value)
    assert gone(daytona_env)


@pytest.mark.parametrize("how, expected, words", [
    ("context", SandboxDied, "context not found"),
    ("worker", SandboxDied, "worker process ended"),
    ("agent", SandboxDied, "lost the Daytona sandbox|stopped"),
    ("daemon-timeout", SandboxTimeout, "Daytona stopped the code"),
])
@on_emulator
def test_run_code_maps_daemon_closes_and_destroys(booted, daytona_env, how, expected, words):
    backend, _ = booted(run_grace=-3 if how == "daemon-timeout" else 30)
    code = "print('last words')\nimport time\ntime.sleep(30)"
    if how == "context":
        backend._sandbox.code_interpreter.delete_context(backend._context)
    elif how == "worker":
        code = "print('last words')\nimport os\nos._exit(1)"
    elif how == "agent":
        threading.Timer(1.0, daytona_env.kill, args=(backend.daytona_id, "agent")).start()
    with pytest.raises(expected, match=words) as caught:
        backend.run_code(code, timeout=6)
    assert type(caught.value) is expected
    if how == "worker":
        assert "last words" in str(caught.value)
    assert gone(daytona_env)
    with pytest.raises(SandboxDied, match="destroyed"):
        backend.run_code("again()", timeout=10)  # never sent: a dead sandbox is not retried


@on_emulator
def test_run_code_times_out_on_the_host_and_destroys(booted, daytona_env):
    backend, _ = booted()
    started = time.monotonic()
    with pytest.raises(SandboxTimeout, match="ran past 1s"):
        backend.run_code("while True: pass", timeout=1)
    assert time.monotonic() - started < 5
    assert gone(daytona_env)


@pytest.mark.parametrize("auto_stop, refreshed", [(15, True), (0, False)])
@on_emulator
def test_run_code_refreshes_activity_during_a_long_run(booted, daytona_env, monkeypatch, auto_stop, refreshed):
    monkeypatch.setattr(dsandbox, "_ACTIVITY_EVERY_MIN", 0.2)
    monkeypatch.setattr(dsandbox, "_ACTIVITY_FRACTION", 0.0001)  # 15 min -> every 0.2 s
    backend, _ = booted(auto_stop_interval=auto_stop)
    daytona_env.reset_requests()
    backend.run_code("import time\ntime.sleep(1.5)", timeout=10)
    refreshes = daytona_env.requests().get("api POST /api/sandbox/{ref}/last-activity", 0)
    assert (refreshes >= 3) if refreshed else (refreshes == 0)


@on_emulator
def test_a_stalled_api_does_not_hold_the_run_timeout(booted, daytona_env, monkeypatch):
    """refresh_activity and the deletion after a timeout hang on the API; the timeout fires anyway."""
    monkeypatch.setattr(dsandbox, "_ACTIVITY_EVERY_MIN", 0.2)
    monkeypatch.setattr(dsandbox, "_ACTIVITY_FRACTION", 0.0001)
    monkeypatch.setattr(dsandbox, "_CLEANUP_WAIT", 1.0)
    backend, _ = booted()
    daytona_env.faults(hang=["api"])
    started = time.monotonic()
    with pytest.raises(SandboxTimeout, match="ran past 2s"):
        backend.run_code("import time\ntime.sleep(30)", timeout=2)
    assert time.monotonic() - started < 2 + 1 + 3  # the timeout, the deletion's wait, slack for a busy box
    assert daytona_env.requests().get("api POST /api/sandbox/{ref}/last-activity", 0) >= 1  # it did try
    daytona_env.clear_faults()  # the API is back: the deletion that went on in the background finishes
    assert gone(daytona_env)


# ------------------------------------------------------------------ leases, reaping, TTL

@on_emulator
def test_the_creating_hook_runs_before_the_create_and_a_failing_one_creates_nothing(daytona_env):
    seen = []

    def register(info):
        creates = daytona_env.requests().get("api POST /api/sandbox", 0)
        seen.append((info, creates))

    interpreter = SandboxInterpreter(DaytonaSandbox, on_sandbox_creating=register)
    try:
        interpreter.start()
        ((info, creates_before),) = seen
        assert creates_before == 0
        assert (info.backend, info.sandbox_id) == ("daytona", interpreter.sandbox_id)
        assert info.labels["rlmq.sandbox"] == interpreter.sandbox_id
        assert info.provider == {"api_url": daytona_env.api_url}  # where a reaper elsewhere must look
    finally:
        interpreter.shutdown()

    def refuse(info):
        raise ConnectionError("redis is down")

    daytona_env.reset_requests()
    with pytest.raises(SandboxStartError, match=r"could not register.*redis is down"):
        SandboxInterpreter(DaytonaSandbox, on_sandbox_creating=refuse).start()
    assert daytona_env.requests().get("api POST /api/sandbox", 0) == 0


@on_emulator
def test_reap_deletes_exactly_the_labelled_sandboxes(daytona_env):
    client = daytona_env.client()
    mine = [client.create(CreateSandboxFromSnapshotParams(labels={"rlmq.run": "r1", "rlmq.sandbox": f"rlmq-{i}"}))
            for i in range(2)]
    other = client.create(CreateSandboxFromSnapshotParams(labels={"rlmq.run": "r2", "rlmq.sandbox": "rlmq-9"}))
    assert reap_daytona_sandboxes({"rlmq.run": "r1"}) == 2
    assert remaining(daytona_env) == [other.name] and all(s.name not in remaining(daytona_env) for s in mine)
    assert reap_daytona_sandboxes({"rlmq.run": "r1"}) == 0
    assert reap_labelled("daytona", {"rlmq.run": "r2"}) == 1 and reap_labelled("local", {"rlmq.run": "r2"}) == 0
    with pytest.raises(ValueError):
        reap_daytona_sandboxes({})


@on_emulator
def test_delete_by_name_only_deletes_rlmq_sandboxes(daytona_env):
    client = daytona_env.client()
    client.create(CreateSandboxFromSnapshotParams(name="rlmq-a", labels={"rlmq.sandbox": "rlmq-a"}))
    client.create(CreateSandboxFromSnapshotParams(name="rlmq-b", labels={"team": "other"}))
    assert delete_daytona_sandbox("rlmq-a") is True
    assert delete_daytona_sandbox("rlmq-a") is False  # already gone: not an error
    with pytest.raises(SandboxError, match="not created by rlmq"):
        delete_daytona_sandbox("rlmq-b")
    assert remaining(daytona_env) == ["rlmq-b"]


@on_emulator
def test_reapers_look_where_the_sandbox_lives_not_only_where_the_environment_points(daytona_env):
    """A worker's environment names one Daytona; the run's sandbox lives on another (its api_url)."""
    with running_emulator(api_key=daytona_env.api_key) as elsewhere:
        backend = DaytonaSandbox(api_url=elsewhere.api_url)
        try:
            backend.boot(new_spec(**{"rlmq.run": "far"}))
            info = backend.info()
            assert info.provider == {"api_url": elsewhere.api_url} and remaining(daytona_env) == []
            destroy_sandbox(info)  # as a reaper rebuilding the info from a lease would
            assert gone(elsewhere)
            orphan = elsewhere.client().create(CreateSandboxFromSnapshotParams(labels={"rlmq.run": "far"}))
            assert reap_labelled("daytona", {"rlmq.run": "far"}, info.provider) == 1  # a dead worker's orphan
            assert remaining(elsewhere) == [] and orphan.name
        finally:
            backend.destroy()


@on_emulator
def test_the_ttl_destroys_a_sandbox_whose_worker_vanished(daytona_env):
    backend = DaytonaSandbox(ttl_minutes=1)
    backend.boot(new_spec())
    daytona_env.clock(minute=0.5)  # the worker "died" holding the sandbox: only the TTL is left
    assert gone(daytona_env, within=5)


# ------------------------------------------------------------------ live

def _gone(client, daytona_id: str, within: float = 90.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = str(client.get(daytona_id).state).lower()
        except DaytonaNotFoundError:
            return True
        if state.endswith(("destroyed", "destroying")):
            return True
        time.sleep(2)
    return False


@pytest.mark.live
@pytest.mark.skipif(not os.environ.get("DAYTONA_API_KEY"), reason="DAYTONA_API_KEY is not set")
def test_live_daytona_sandbox_boots_runs_and_is_deleted():
    spec = SandboxSpec(
        sandbox_id=f"rlmq-test-{uuid.uuid4().hex[:12]}",
        host_token_sha256=token_digest(secrets.token_urlsafe(32)),
        sandbox_token=secrets.token_urlsafe(32),
        labels={"rlmq.test": "daytona-backend"},
    )
    backend = DaytonaSandbox(boot_timeout=300, ttl_minutes=30)
    try:
        endpoint = backend.boot(spec)
        request = urllib.request.Request(endpoint.url + PATH_HEALTH, headers=endpoint.headers)
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200 and isinstance(json.loads(resp.read()), dict)
        try:  # private sandbox: without the preview token the broker is out of reach
            with urllib.request.urlopen(endpoint.url + PATH_HEALTH, timeout=30) as resp:
                assert not resp.read().lstrip().startswith(b"{"), "the broker answered without the preview token"
        except urllib.error.HTTPError as exc:
            assert exc.code in (401, 403)

        backend.put_file("inputs/probe.txt", b"six")
        backend.run_code("x = 6", timeout=60)  # one persistent context: x survives
        backend.run_code(
            "import pathlib\n"
            "word = pathlib.Path('inputs/probe.txt').read_text()\n"
            "pathlib.Path('out.txt').write_text(f'{word} {x * 7}')\n", timeout=60)
        assert backend._sandbox is not None
        assert backend._sandbox.fs.download_file(f"{backend.runtime_dir}/out.txt") == b"six 42"

        daytona_id = backend.daytona_id
        assert daytona_id is not None
        with pytest.raises(SandboxTimeout):
            backend.run_code("import time\ntime.sleep(120)", timeout=5)  # destroys the sandbox
        assert _gone(dclient.daytona_client(), daytona_id)
    finally:
        backend.destroy()
        with contextlib.suppress(Exception):  # a leftover must not hide the failure above
            reap_daytona_sandboxes({"rlmq.sandbox": spec.sandbox_id})
