"""The Daytona backend, offline against the real SDK, plus one live test.

Offline means no Daytona cloud, not no SDK: errors come from the SDK's own translation of HTTP
answers (a fake Daytona API on loopback), ``run_code`` goes through the SDK's real code-interpreter
client to a fake daemon websocket, and boot starts the real broker from the real runtime files on
this machine behind a fake preview proxy that checks the token header.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import math
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

daytona = pytest.importorskip("daytona")
import httpx  # noqa: E402
from daytona import (  # noqa: E402
    CreateSandboxFromImageParams,
    CreateSandboxFromSnapshotParams,
    DaytonaConfig,
    DaytonaConflictError,
    DaytonaError,
    DaytonaNotFoundError,
    DaytonaTimeoutError,
    ListSandboxesQuery,
)
from daytona._sync.code_interpreter import CodeInterpreter  # noqa: E402
from daytona._utils.errors import create_daytona_error  # noqa: E402
from daytona_toolbox_api_client import ApiClient as ToolboxApiClient  # noqa: E402
from daytona_toolbox_api_client import Configuration as ToolboxConfiguration  # noqa: E402
from daytona_toolbox_api_client import InterpreterApi, InterpreterContext  # noqa: E402
from wsproto import ConnectionType, WSConnection  # noqa: E402
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage  # noqa: E402

from broker_bridge.backends import daytona as dmod  # noqa: E402
from broker_bridge.backends import daytona_setup as dsetup  # noqa: E402
from broker_bridge.backends.base import (  # noqa: E402
    RUNTIME_FILES,
    SANDBOX_SOURCE_DIR,
    SandboxCapacityError,
    SandboxDied,
    SandboxError,
    SandboxSpec,
    SandboxStartError,
    SandboxTimeout,
)
from broker_bridge.backends.daytona import (  # noqa: E402
    DaytonaSandbox,
    OutputLog,
    delete_daytona_sandbox,
    reap_daytona_sandboxes,
)
from broker_bridge.backends.daytona_setup import (  # noqa: E402
    PREVIEW_TOKEN_HEADER,
    DaytonaOptions,
    build_create_params,
    describe_daytona_error,
    preview_headers,
)
from broker_bridge.sandbox.protocol import KEEPALIVE_MARKER, PATH_HEALTH, token_digest  # noqa: E402

SPEC = SandboxSpec(
    sandbox_id="rlmq-0123456789abcdef",
    host_token_sha256="ab" * 32,
    sandbox_token="sandbox-token-not-for-labels",
    labels={"rlmq.run": "run-1"},
)
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(autouse=True)
def no_cached_clients():
    dsetup._clients.clear()
    yield
    dsetup._clients.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ error mapping (SDK instances)

def _close_error(code: int, reason: str) -> DaytonaError:
    """The exception the SDK's code-interpreter client raises for a daemon websocket close."""
    try:
        CodeInterpreter._maybe_raise_from_close(None, code, reason)
    except DaytonaError as exc:
        return exc
    raise AssertionError(f"close code {code} raised nothing")


@pytest.mark.parametrize(
    "exc, during, expected, words",
    [
        (create_daytona_error("Too many requests", status_code=429, headers={"Retry-After": "7"}),
         "creating the sandbox", SandboxCapacityError, ["rate limit", "retry later", "7"]),
        (create_daytona_error("Total CPU limit exceeded. Maximum allowed: 10.\nUpgrade your tier", status_code=403),
         "creating the sandbox", SandboxCapacityError, ["quota", "Total CPU limit exceeded"]),
        (create_daytona_error("Total disk limit exceeded. Maximum allowed: 30GiB.", status_code=400),
         "creating the sandbox", SandboxCapacityError, ["quota"]),
        (create_daytona_error("No available runners", status_code=400),
         "creating the sandbox", SandboxCapacityError, ["No available runners"]),
        (create_daytona_error("CPU request 8 exceeds maximum allowed per sandbox (4).", status_code=403),
         "creating the sandbox", SandboxStartError, ["per-sandbox limit"]),
        (create_daytona_error("Invalid API key", status_code=401),
         "creating the sandbox", SandboxStartError, ["rejected the API key", "DAYTONA_API_KEY"]),
        (create_daytona_error("Organization is suspended", status_code=403),
         "creating the sandbox", SandboxStartError, ["403", "suspended"]),
        (create_daytona_error("Snapshot nope not found. Did you add it?", status_code=400),
         "creating the sandbox", SandboxStartError, ["Snapshot nope not found"]),
        (create_daytona_error("Sandbox with name rlmq-x already exists", status_code=409),
         "creating the sandbox", SandboxStartError, ["already exists"]),
        (create_daytona_error("Service unavailable", status_code=503),
         "creating the sandbox", SandboxCapacityError, ["retry later"]),
        (create_daytona_error("Sandbox not found", status_code=404),
         "starting the broker", SandboxStartError, ["not found"]),
        (create_daytona_error("Sandbox not found", status_code=404),
         "running code", SandboxDied, ["gone"]),
        (create_daytona_error("Sandbox is not running", status_code=400, code="SANDBOX_NOT_RUNNING",
                              source="DAYTONA_PROXY"),
         "running code", SandboxDied, ["stopped"]),
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


# ------------------------------------------------------------------ create params

def test_constructor_takes_every_option_by_name():
    import dataclasses
    import inspect

    from broker_bridge.factory import interpreter_factory

    accepted = set(inspect.signature(DaytonaSandbox.__init__).parameters) - {"self"}
    assert {f.name for f in dataclasses.fields(DaytonaOptions)} <= accepted
    backend = DaytonaSandbox(auto_stop_interval=5, snapshot="snap", boot_timeout=10)
    assert (backend.options.auto_stop_interval, backend.options.snapshot) == (5, "snap")
    interpreter_factory("daytona", auto_stop_interval=5, api_url="http://x")  # accepted by the factory
    with pytest.raises(TypeError):
        interpreter_factory("daytona", auto_stop=5)
    assert "secret" not in repr(DaytonaOptions(api_key="secret"))


def test_create_params_are_labelled_named_private_and_carry_no_env():
    params = build_create_params(SPEC, DaytonaOptions())
    assert isinstance(params, CreateSandboxFromSnapshotParams)
    assert params.name == SPEC.sandbox_id
    assert params.labels == {"rlmq.run": "run-1", "rlmq.sandbox": SPEC.sandbox_id}
    assert params.auto_stop_interval == 15
    assert params.auto_delete_interval == 0  # SDK: 0 = delete as soon as it stops
    assert params.public is False
    assert params.env_vars is None and params.secrets is None
    assert params.language == "python"
    assert params.snapshot is None


def test_create_params_options():
    params = build_create_params(SPEC, DaytonaOptions(snapshot="snap", auto_stop_interval=5,
                                                      auto_delete_interval=-1, target="eu", ttl_minutes=90))
    assert (params.snapshot, params.auto_stop_interval, params.auto_delete_interval) == ("snap", 5, -1)
    assert (params.target, params.ttl_minutes) == ("eu", 90)
    assert build_create_params(SPEC, DaytonaOptions(ephemeral=True)).auto_delete_interval == 0
    image = build_create_params(SPEC, DaytonaOptions(image="python:3.12-slim", resources={"cpu": 2, "memory": 4}))
    assert isinstance(image, CreateSandboxFromImageParams)
    assert (image.resources.cpu, image.resources.memory) == (2, 4)
    for bad in (dict(snapshot="a", image="b"), dict(resources={"cpu": 1}), dict(ephemeral=True, auto_delete_interval=5)):
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
        dsetup.check_no_secrets(params, SPEC)


# ------------------------------------------------------------------ client, key, headers, output

def test_missing_api_key_fails_at_boot_and_creates_nothing(monkeypatch):
    monkeypatch.delenv("DAYTONA_API_KEY", raising=False)
    monkeypatch.setattr(daytona, "Daytona", lambda *a, **k: pytest.fail("a client was constructed"))
    backend = DaytonaSandbox()  # constructing reads nothing
    with pytest.raises(SandboxStartError, match="DAYTONA_API_KEY is not set"):
        backend.boot(SPEC)
    assert not dsetup._clients
    backend.destroy()  # nothing to do, no error


def test_client_is_cached_per_process_and_forgotten_in_a_fork(monkeypatch):
    made = []

    class FakeDaytona:
        def __init__(self, config):
            made.append(config)

    monkeypatch.setenv("DAYTONA_API_KEY", "key-1")
    monkeypatch.setattr(daytona, "Daytona", FakeDaytona)
    first = dsetup.daytona_client()
    assert dsetup.daytona_client() is first and len(made) == 1 and made[0].api_key == "key-1"
    assert dsetup.daytona_client(api_key="key-2") is not first
    pid = os.fork()
    if pid == 0:  # child: the parent's clients are forgotten, a new one is made on demand
        ok = not dsetup._clients and dsetup.daytona_client() is not first
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_preview_header_is_the_one_the_sdk_documents():
    assert preview_headers("tok") == {"X-Daytona-Preview-Token": "tok", "X-Daytona-Skip-Preview-Warning": "true"}
    assert PREVIEW_TOKEN_HEADER in daytona.Sandbox.get_preview_link.__doc__
    assert PREVIEW_TOKEN_HEADER not in preview_headers("")


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


# ------------------------------------------------------------------ a fake Daytona API (real SDK client)

class FakeApi:
    """Answers the Daytona REST API with canned responses and records what the SDK sent."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.answers: dict[tuple[str, str], tuple[int, dict, dict]] = {}
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                api.requests.append((self.command, self.path, dict(self.headers), body))
                path = self.path.split("?")[0]
                status, payload, headers = api.answers.get(
                    (self.command, path), (404, {"statusCode": 404, "message": "Sandbox not found"}, {}))
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def client(self):
        return daytona.Daytona(DaytonaConfig(api_key="test-key-123", api_url=self.url, target="us",
                                             use_deprecated_polling=True))


@pytest.fixture
def fake_api():
    api = FakeApi()
    yield api
    api.server.shutdown()
    api.server.server_close()


def test_create_request_over_http_is_private_labelled_and_maps_rate_limit(fake_api):
    fake_api.answers[("POST", "/sandbox")] = (
        429, {"statusCode": 429, "message": "ThrottlerException: Too Many Requests"}, {"Retry-After": "7"})
    backend = DaytonaSandbox(client=fake_api.client())
    with pytest.raises(SandboxCapacityError, match="rate limit.*Retry-After: 7.*retry later"):
        backend.boot(SPEC)
    assert [(m, p.split("?")[0]) for m, p, _, _ in fake_api.requests] == [("POST", "/sandbox")]  # no cleanup calls
    _, _, headers, body = fake_api.requests[0]
    sent = json.loads(body)
    assert headers["Authorization"] == "Bearer test-key-123"
    assert sent["name"] == SPEC.sandbox_id
    assert sent["labels"] == {"rlmq.run": "run-1", "rlmq.sandbox": SPEC.sandbox_id, "code-toolbox-language": "python"}
    assert (sent["autoStopInterval"], sent["autoDeleteInterval"], sent["public"]) == (15, 0, False)
    assert sent.get("env") in ({}, None) and not sent.get("secrets")
    for secret in ("test-key-123", SPEC.sandbox_token):
        assert secret not in body.decode()


@pytest.mark.parametrize(
    "status, message, expected, cleanup",
    [
        (403, "Total memory limit exceeded. Maximum allowed: 20GiB.", SandboxCapacityError, False),
        (401, "Unauthorized", SandboxStartError, False),
        (409, "Sandbox with name rlmq-0123456789abcdef already exists", SandboxStartError, False),
        (500, "Internal server error", SandboxStartError, True),  # may exist: look it up by name
    ],
)
def test_create_errors_over_http(fake_api, status, message, expected, cleanup):
    fake_api.answers[("POST", "/sandbox")] = (status, {"statusCode": status, "message": message}, {})
    with pytest.raises(expected) as caught:
        DaytonaSandbox(client=fake_api.client()).boot(SPEC)
    assert type(caught.value) is expected
    calls = [(m, p.split("?")[0]) for m, p, _, _ in fake_api.requests]
    assert calls == [("POST", "/sandbox")] + ([("GET", f"/sandbox/{SPEC.sandbox_id}")] if cleanup else [])


# ------------------------------------------------------------------ a sandbox double on this machine

class PreviewProxy:
    """Stands in for Daytona's preview proxy: 401 without the token, 502 until the port answers."""

    def __init__(self, port: int, token: str):
        self.authorized = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.headers.get(PREVIEW_TOKEN_HEADER) != token:
                    return self._send(401, b'{"error": "unauthorized"}')
                proxy.authorized += 1
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{self.path}", timeout=5) as resp:
                        return self._send(resp.status, resp.read())
                except urllib.error.HTTPError as exc:
                    return self._send(exc.code, exc.read())
                except OSError:
                    return self._send(502, b"bad gateway")

            def _send(self, status, data):
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class SandboxDouble:
    """The surface of ``daytona.Sandbox`` the backend uses, acted out on this machine."""

    def __init__(self, params, home: Path, *, setup_exit: int = 0):
        self.id, self.name, self.labels = f"uuid-{uuid.uuid4().hex[:8]}", params.name, dict(params.labels or {})
        self.state, self.home, self.setup_exit = "started", home, setup_exit
        self.delete_calls, self.deleted, self.activity = 0, False, 0
        self.procs: dict[str, subprocess.Popen] = {}
        self.session_requests: list = []
        self.execs: list[str] = []
        self.proxy: PreviewProxy | None = None
        self.fs = SimpleNamespace(upload_files=self._upload_files, create_folder=self._create_folder)
        self.process = SimpleNamespace(
            exec=self._exec, create_session=lambda session_id: None,
            execute_session_command=self._execute_session_command,
            get_session_command=lambda s, cmd_id: SimpleNamespace(exit_code=self.procs[cmd_id].poll()),
            get_session_command_logs=lambda s, cmd_id: SimpleNamespace(
                output=(self.home / f"{cmd_id}.log").read_text(), stdout=None, stderr=None),
        )
        self.code_interpreter = SimpleNamespace(create_context=lambda cwd=None: InterpreterContext(
            id="ctx-1", active=True, created_at="now", cwd=cwd or str(home), language="python"))

    def _env(self):
        return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}

    def _upload_files(self, files, timeout=1800):
        for upload in files:
            Path(upload.destination).parent.mkdir(parents=True, exist_ok=True)
            Path(upload.destination).write_bytes(upload.source)

    def _create_folder(self, path, mode):
        Path(path).mkdir(parents=True, exist_ok=True)

    def _exec(self, command, cwd=None, env=None, timeout=None):
        self.execs.append(command)
        if self.setup_exit:
            return SimpleNamespace(exit_code=self.setup_exit, result="ERROR: No matching distribution found for flask")
        done = subprocess.run(command, shell=True, env=self._env(), capture_output=True, text=True, timeout=timeout)
        return SimpleNamespace(exit_code=done.returncode, result=done.stdout + done.stderr)

    def _execute_session_command(self, session_id, req, timeout=None):
        self.session_requests.append(req)
        cmd_id = f"cmd-{len(self.procs)}"
        with open(self.home / f"{cmd_id}.log", "wb") as log_file:
            self.procs[cmd_id] = subprocess.Popen(["sh", "-c", req.command], env=self._env(), stdout=log_file,
                                                  stderr=subprocess.STDOUT, start_new_session=True)
        return SimpleNamespace(cmd_id=cmd_id, exit_code=None, output="")

    def get_user_home_dir(self):
        return str(self.home)

    def get_preview_link(self, port):
        self.proxy = self.proxy or PreviewProxy(port, token="preview-token-1")
        return SimpleNamespace(url=self.proxy.url + "/", token="preview-token-1", sandbox_id=self.id)

    def refresh_activity(self):
        self.activity += 1

    def delete(self, timeout=60, wait=False):
        self.delete_calls += 1
        if self.deleted:
            raise DaytonaNotFoundError("Sandbox not found", status_code=404)
        self.deleted, self.state = True, "destroyed"
        self.stop()

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
        if self.proxy:
            self.proxy.close()
            self.proxy = None


class ClientDouble:
    """The surface of ``daytona.Daytona`` the backend and the reapers use."""

    def __init__(self, home: Path, *, fail_create: Exception | None = None, create_anyway: bool = False,
                 setup_exit: int = 0, filter_labels: bool = True):
        self.home, self.fail_create, self.create_anyway = home, fail_create, create_anyway
        self.setup_exit, self.filter_labels = setup_exit, filter_labels
        self.sandboxes: list[SandboxDouble] = []
        self.queries: list = []

    def add(self, params) -> SandboxDouble:
        home = self.home / f"sb-{uuid.uuid4().hex[:8]}"
        home.mkdir()
        sandbox = SandboxDouble(params, home, setup_exit=self.setup_exit)
        self.sandboxes.append(sandbox)
        return sandbox

    def create(self, params, *, timeout=60):
        self.created_params = params
        if self.fail_create is not None:
            if self.create_anyway:
                sandbox = self.add(params)
                if isinstance(self.fail_create, DaytonaTimeoutError):
                    self.fail_create._attach_sandbox_id(sandbox.id)
            raise self.fail_create
        return self.add(params)

    def get(self, id_or_name):
        for sandbox in self.sandboxes:
            if id_or_name in (sandbox.id, sandbox.name) and not sandbox.deleted:
                return sandbox
        raise DaytonaNotFoundError(f"Sandbox {id_or_name} not found", status_code=404)

    def list(self, query=None):
        self.queries.append(query)
        for sandbox in list(self.sandboxes):
            wanted = (query.labels or {}) if query and self.filter_labels else {}
            if not sandbox.deleted and all(sandbox.labels.get(k) == v for k, v in wanted.items()):
                yield sandbox

    def stop_all(self):
        for sandbox in self.sandboxes:
            sandbox.stop()


@pytest.fixture
def client(tmp_path):
    doubles: list[ClientDouble] = []

    def make(**kwargs) -> ClientDouble:
        doubles.append(ClientDouble(tmp_path, **kwargs))
        return doubles[-1]

    yield make
    for double in doubles:
        double.stop_all()


def test_boot_installs_runtime_starts_broker_and_waits_for_health(client):
    clients = client()
    port = free_port()
    backend = DaytonaSandbox(client=clients, broker_port=port, boot_timeout=30)
    endpoint = backend.boot(SPEC)
    sandbox = clients.sandboxes[0]
    try:
        assert backend.runtime_dir == f"{sandbox.home}/rlmq"
        for name in RUNTIME_FILES:
            assert (sandbox.home / "rlmq" / name).read_bytes() == (SANDBOX_SOURCE_DIR / name).read_bytes()
        assert endpoint.url == sandbox.proxy.url  # trailing slash trimmed
        assert endpoint.inside_url == f"http://127.0.0.1:{port}"
        assert endpoint.headers == {PREVIEW_TOKEN_HEADER: "preview-token-1", "X-Daytona-Skip-Preview-Warning": "true"}
        assert sandbox.proxy.authorized >= 1  # /health went through the proxy with the token
        with urllib.request.urlopen(urllib.request.Request(endpoint.url + PATH_HEALTH, headers=endpoint.headers)) as r:
            assert r.status == 200 and isinstance(json.loads(r.read()), dict)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(endpoint.url + PATH_HEALTH)  # no token, no way in

        (request,) = sandbox.session_requests
        assert request.run_async is True
        assert "--bind 0.0.0.0" in request.command and f"--port {port}" in request.command
        assert token_digest(SPEC.sandbox_token) in request.command and SPEC.sandbox_token not in request.command
        assert "import flask" in sandbox.execs[0]
        assert backend._context.cwd == backend.runtime_dir
        runtime_bytes = sum((SANDBOX_SOURCE_DIR / name).stat().st_size for name in RUNTIME_FILES)
        assert runtime_bytes < backend.bytes_sent < runtime_bytes + 2000

        before = backend.bytes_sent
        backend.put_file("inputs/abc123", b"war and peace")
        assert (sandbox.home / "rlmq" / "inputs" / "abc123").read_bytes() == b"war and peace"
        assert backend.bytes_sent == before + len(b"war and peace")
        for bad in ("../escape", "/etc/passwd", "inputs//x", ""):
            with pytest.raises(ValueError):
                backend.put_file(bad, b"")

        info = backend.info()
        assert (info.backend, info.sandbox_id) == ("daytona", SPEC.sandbox_id)
        assert info.labels == {"rlmq.run": "run-1", "rlmq.sandbox": SPEC.sandbox_id}
    finally:
        backend.destroy()
    assert sandbox.deleted and all(proc.poll() is not None for proc in sandbox.procs.values())
    backend.destroy()
    assert sandbox.delete_calls == 1
    with pytest.raises(SandboxDied):
        backend.put_file("late", b"x")


def test_boot_fails_fast_when_the_broker_exits_and_deletes_the_sandbox(client, monkeypatch):
    monkeypatch.setattr(dmod, "_PROBE_EVERY", 0.2)
    monkeypatch.setattr(dmod, "runtime_file_contents", lambda: {
        "broker.py": b"import sys\nprint('broker exploded')\nsys.exit(3)\n", "protocol.py": b"", "runtime.py": b""})
    clients = client()
    backend = DaytonaSandbox(client=clients, broker_port=free_port(), boot_timeout=30)
    started = time.monotonic()
    with pytest.raises(SandboxStartError, match="exited with code 3.*broker exploded"):
        backend.boot(SPEC)
    assert time.monotonic() - started < 10
    assert clients.sandboxes[0].deleted and "broker exploded" in backend.broker_log


def test_boot_times_out_when_health_never_answers(client, monkeypatch):
    monkeypatch.setattr(dmod, "runtime_file_contents", lambda: {
        "broker.py": b"import time\ntime.sleep(60)\n", "protocol.py": b"", "runtime.py": b""})
    clients = client()
    backend = DaytonaSandbox(client=clients, broker_port=free_port(), boot_timeout=4)
    with pytest.raises(SandboxStartError, match="did not answer /health.*HTTP 502"):
        backend.boot(SPEC)
    sandbox = clients.sandboxes[0]
    assert sandbox.deleted and all(proc.poll() is not None for proc in sandbox.procs.values())


def test_boot_fails_clearly_without_flask_and_deletes_the_sandbox(client):
    clients = client(setup_exit=1)
    with pytest.raises(SandboxStartError, match="Flask.*No matching distribution"):
        DaytonaSandbox(client=clients, broker_port=free_port()).boot(SPEC)
    assert clients.sandboxes[0].deleted and not clients.sandboxes[0].session_requests


def test_create_timeout_deletes_the_sandbox_daytona_made(client):
    clients = client(fail_create=DaytonaTimeoutError("Sandbox failed to become ready within the timeout"),
                     create_anyway=True)
    with pytest.raises(SandboxStartError, match="timed out"):
        DaytonaSandbox(client=clients).boot(SPEC)
    assert clients.sandboxes[0].deleted


def test_lost_create_response_deletes_our_sandbox_but_a_conflict_leaves_theirs(client):
    clients = client(fail_create=DaytonaError("Failed to create sandbox: connection reset"), create_anyway=True)
    with pytest.raises(SandboxStartError):
        DaytonaSandbox(client=clients).boot(SPEC)
    assert clients.sandboxes[0].deleted

    clients = client(fail_create=DaytonaConflictError("already exists", status_code=409))
    existing = clients.add(build_create_params(SPEC, DaytonaOptions()))
    with pytest.raises(SandboxStartError, match="already exists"):
        DaytonaSandbox(client=clients).boot(SPEC)
    assert not existing.deleted


# ------------------------------------------------------------------ run_code: SDK client, fake daemon

class FakeDaemon:
    """The daemon's interpreter websocket (/process/interpreter/execute), scripted per test."""

    def __init__(self):
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.release = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        ws = WSConnection(ConnectionType.SERVER)
        try:
            text = None
            while text is None:
                data = conn.recv(65536)
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        conn.sendall(ws.send(AcceptConnection()))
                    elif isinstance(event, TextMessage):
                        text = event.data
            self.requests.append(json.loads(text))
            for kind, *args in self.script:
                if kind == "hang":
                    self.release.wait(30)
                    return
                if kind == "close":
                    conn.sendall(ws.send(CloseConnection(code=args[0], reason=args[1])))
                    conn.settimeout(2)
                    while conn.recv(65536):  # until the client answers the close and hangs up
                        pass
                    return
                chunk = {"type": kind, "text": args[0]} if kind in ("stdout", "stderr", "control") else \
                    {"type": "error", "name": args[0], "value": args[1], "traceback": args[2]}
                conn.sendall(ws.send(TextMessage(data=json.dumps(chunk))))
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.release.set()
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture
def daemon():
    fake = FakeDaemon()
    yield fake
    fake.close()


@pytest.fixture
def running(daemon, tmp_path):
    """A DaytonaSandbox as boot() leaves it, whose code interpreter is the SDK's, talking to the daemon."""
    http_client = httpx.Client()
    sandbox = SandboxDouble(SimpleNamespace(name=SPEC.sandbox_id, labels={}), tmp_path)
    sandbox.code_interpreter = CodeInterpreter(InterpreterApi(ToolboxApiClient(ToolboxConfiguration(host=daemon.url))),
                                               http_client=http_client)
    backend = DaytonaSandbox(client=object(), run_grace=30)
    backend._spec, backend._sandbox, backend._runtime_dir = SPEC, sandbox, str(tmp_path / "rlmq")
    backend._context = InterpreterContext(id="ctx-1", active=True, created_at="now", cwd=str(tmp_path),
                                          language="python")
    yield backend, sandbox
    http_client.close()


def test_run_code_streams_output_without_keepalives(running, daemon, caplog):
    caplog.set_level(logging.DEBUG, logger="broker_bridge.backends.daytona")
    backend, sandbox = running
    daemon.script = [("stdout", "step 1\n"), ("stdout", KEEPALIVE_MARKER[:5]), ("stdout", KEEPALIVE_MARKER[5:] + "\n"),
                     ("stderr", "careful\n"), ("control", "completed"), ("close", 1000, "")]
    before = backend.bytes_sent
    assert backend.run_code("x = 6 * 7", timeout=12.5) is None
    (request,) = daemon.requests
    assert request == {"code": "x = 6 * 7", "contextId": "ctx-1", "timeout": math.ceil(12.5 + 30)}
    assert backend.bytes_sent == before + len("x = 6 * 7")
    logged = [r.getMessage() for r in caplog.records if r.name == "broker_bridge.backends.daytona"]
    assert "[rlmq-0123456789abcdef stdout] step 1" in logged and "[rlmq-0123456789abcdef stderr] careful" in logged
    assert not any("keep-alive" in line for line in logged)
    assert not sandbox.deleted


def test_run_code_reports_an_error_escaping_the_driver_but_keeps_the_sandbox(running, daemon, caplog):
    backend, sandbox = running
    daemon.script = [("error", "NameError", "name 'rt' is not defined", "Traceback ..."), ("control", "completed"),
                     ("close", 1000, "")]
    backend.run_code("rt.execute()", timeout=10)
    assert backend.last_execution_error.name == "NameError"
    assert any("NameError" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert not sandbox.deleted


@pytest.mark.parametrize(
    "close, expected, words",
    [
        ((4008, ""), SandboxTimeout, "Daytona stopped the code"),
        ((1008, "context not found: ctx-1"), SandboxDied, "context not found"),
        ((1001, "worker process ended"), SandboxDied, "worker process ended"),
        ((1011, "internal error"), SandboxDied, "lost the Daytona sandbox"),
    ],
)
def test_run_code_maps_daemon_closes_and_destroys(running, daemon, close, expected, words):
    backend, sandbox = running
    daemon.script = [("stdout", "last words\n"), ("close", *close)]
    with pytest.raises(expected, match=words) as caught:
        backend.run_code("work()", timeout=10)
    assert type(caught.value) is expected
    assert sandbox.deleted and sandbox.delete_calls == 1
    if expected is SandboxDied:
        assert "last words" in str(caught.value)
    with pytest.raises(SandboxDied, match="destroyed"):
        backend.run_code("again()", timeout=10)  # never sent: a dead sandbox is not retried
    assert len(daemon.requests) == 1


def test_run_code_times_out_on_the_host_and_destroys(running, daemon):
    backend, sandbox = running
    daemon.script = [("stdout", "working\n"), ("hang",)]
    started = time.monotonic()
    with pytest.raises(SandboxTimeout, match="ran past 0.5s"):
        backend.run_code("while True: pass", timeout=0.5)
    assert time.monotonic() - started < 5
    assert sandbox.deleted


@pytest.mark.parametrize("auto_stop, refreshed", [(15, True), (0, False)])
def test_run_code_refreshes_activity_during_a_long_run(running, daemon, monkeypatch, auto_stop, refreshed):
    monkeypatch.setattr(dmod, "_ACTIVITY_EVERY_MIN", 0.05)
    monkeypatch.setattr(dmod, "_ACTIVITY_FRACTION", 0.0001)  # 15 min -> every 0.09 s
    backend, sandbox = running
    backend.options = DaytonaOptions(auto_stop_interval=auto_stop)
    daemon.script = [("hang",)]
    with pytest.raises(SandboxTimeout):
        backend.run_code("slow()", timeout=1.0)
    assert (sandbox.activity >= 3) if refreshed else (sandbox.activity == 0)


# ------------------------------------------------------------------ reaping

def test_reap_deletes_exactly_the_labelled_sandboxes(client):
    clients = client(filter_labels=False)  # a server that ignores the filter: the reaper still checks
    mine = [clients.add(SimpleNamespace(name=f"rlmq-{i}", labels={"rlmq.run": "r1", "rlmq.sandbox": f"rlmq-{i}"}))
            for i in range(2)]
    other = clients.add(SimpleNamespace(name="rlmq-9", labels={"rlmq.run": "r2", "rlmq.sandbox": "rlmq-9"}))
    assert reap_daytona_sandboxes({"rlmq.run": "r1"}, client=clients) == 2
    assert all(sb.deleted for sb in mine) and not other.deleted
    (query,) = clients.queries
    assert isinstance(query, ListSandboxesQuery) and query.labels == {"rlmq.run": "r1"}
    assert reap_daytona_sandboxes({"rlmq.run": "r1"}, client=clients) == 0
    with pytest.raises(ValueError):
        reap_daytona_sandboxes({}, client=clients)


def test_delete_by_name_only_deletes_rlmq_sandboxes(client):
    clients = client()
    ours = clients.add(SimpleNamespace(name="rlmq-a", labels={"rlmq.sandbox": "rlmq-a"}))
    theirs = clients.add(SimpleNamespace(name="rlmq-b", labels={"team": "other"}))
    assert delete_daytona_sandbox("rlmq-a", client=clients) is True and ours.deleted
    assert delete_daytona_sandbox("rlmq-a", client=clients) is False  # already gone: not an error
    with pytest.raises(SandboxError, match="not created by rlmq"):
        delete_daytona_sandbox("rlmq-b", client=clients)
    assert not theirs.deleted


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
    backend = DaytonaSandbox(boot_timeout=300)
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
        assert backend._sandbox.fs.download_file(f"{backend.runtime_dir}/out.txt") == b"six 42"

        daytona_id = backend.daytona_id
        with pytest.raises(SandboxTimeout):
            backend.run_code("import time\ntime.sleep(120)", timeout=5)  # destroys the sandbox
        assert _gone(dsetup.daytona_client(), daytona_id)
    finally:
        backend.destroy()
        with contextlib.suppress(Exception):  # a leftover must not hide the failure above
            reap_daytona_sandboxes({dsetup.SANDBOX_LABEL: spec.sandbox_id})
