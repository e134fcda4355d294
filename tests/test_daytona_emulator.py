"""The Daytona emulator, driven by the unmodified ``daytona`` SDK (0.226) in its production mode
(socket.io state events): every path rlmq uses and the common ones a user would, Daytona's errors,
the fault knobs, and the isolation of its sandboxes."""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import daytona  # its errors as daytona.X
import httpx
import pytest
from daytona import (
    AsyncDaytona,
    CreateSandboxFromSnapshotParams,
    DaytonaConfig,
    FileDownloadRequest,
    FileUpload,
    ListSandboxesQuery,
    SessionExecuteRequest,
)

from tests.support.daytona_emulator.harness import REPO, running_emulator
from tests.support.sandboxes import needs_namespaces

pytestmark = [
    pytest.mark.slow,
    needs_namespaces,
]


@pytest.fixture
def client(emulator):
    return emulator.client()


def make(client, name=None, labels=None, **params):
    return client.create(CreateSandboxFromSnapshotParams(name=name, labels=labels or {}, **params), timeout=60)


def serve_identity(sandbox, port=8765, text=None):
    """A web server on ``port`` inside the sandbox answering with ``text`` (its id by default)."""
    sandbox.fs.upload_files([FileUpload(source=(text or sandbox.id).encode(), destination="site/who.txt")])
    sandbox.process.create_session("web")
    sandbox.process.execute_session_command(
        "web", SessionExecuteRequest(command=f"cd site && python3 -m http.server {port} --bind 127.0.0.1",
                                     run_async=True))


def fetch(url, headers=None, timeout=10):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def gets_during_create(emulator):
    return emulator.requests().get("api GET /api/sandbox/{ref}", 0)


# ---------------------------------------------------------------- the API: sandboxes

def test_state_changes_reach_the_sdk_as_socketio_events(emulator, client):
    emulator.clock(create_delay=1.0)
    started = time.monotonic()
    sandbox = make(client, name="first", labels={"team": "a", "rlmq.run": "r1"})
    assert sandbox.state.value == "started" and time.monotonic() - started >= 1.0  # waited out "creating"
    assert client._event_dispatcher is not None and client._event_dispatcher.is_connected
    headers = {"Authorization": f"Bearer {emulator.api_key}"}
    for action, state in (("stop", "stopped"), ("start", "started")):
        # changed behind the SDK's back: only an event can tell the Sandbox object (reading .state calls nothing)
        assert httpx.post(f"{emulator.api_url}/sandbox/{sandbox.id}/{action}", headers=headers).status_code == 200
        assert wait_until(lambda state=state: sandbox.state.value == state, timeout=5), (action, sandbox.state)
    assert sandbox.labels == {"team": "a", "rlmq.run": "r1", "code-toolbox-language": "python"}
    assert sandbox.toolbox_proxy_url == f"{emulator.base_url}/toolbox"
    assert client._sandbox_api.get_toolbox_proxy_url(sandbox.id).url == sandbox.toolbox_proxy_url  # generated client

    assert client.get(sandbox.id).name == "first" and client.get("first").id == sandbox.id
    assert [s.id for s in client.list(ListSandboxesQuery(labels={"rlmq.run": "r1"}))] == [sandbox.id]
    assert list(client.list(ListSandboxesQuery(labels={"rlmq.run": "other"}))) == []
    assert sandbox.set_labels({"team": "b"}) == {"team": "b"}
    assert client.get(sandbox.id).labels == {"team": "b"}

    sandbox.delete(wait=True)  # waits on "destroyed", treating the 404 that follows as gone
    with pytest.raises(daytona.DaytonaNotFoundError):
        client.get(sandbox.id)
    assert list(client.list(ListSandboxesQuery(labels={"team": "b"}))) == []
    assert emulator.sandboxes() == []


def test_list_follows_the_cursor_over_pages(emulator, client):
    made = [make(client, labels={"batch": "p"}) for _ in range(3)]
    emulator.reset_requests()
    found = list(client.list(ListSandboxesQuery(labels={"batch": "p"}, limit=2)))
    assert sorted(s.id for s in found) == sorted(s.id for s in made)
    assert emulator.requests()["api GET /api/sandbox"] == 2  # two pages: the SDK followed nextCursor
    with pytest.raises(daytona.DaytonaError, match="limit"):
        list(client.list(ListSandboxesQuery(limit=0)))


def test_names_are_unique_and_errors_have_daytona_bodies(emulator, client):
    make(client, name="taken")
    with pytest.raises(daytona.DaytonaConflictError, match="already exists") as caught:
        make(client, name="taken")
    assert caught.value.status_code == 409 and caught.value.code == "CONFLICT" and caught.value.source == "DAYTONA_API"
    with pytest.raises(daytona.DaytonaNotFoundError) as missing:
        client.get("no-such-sandbox")
    assert missing.value.status_code == 404
    with pytest.raises(daytona.DaytonaError, match="Snapshot nope not found"):
        make(client, snapshot="nope")
    response = httpx.get(f"{emulator.api_url}/sandbox/no-such", headers={"Authorization": f"Bearer {emulator.api_key}"})
    body = response.json()
    assert {"statusCode", "message", "code", "path", "method", "timestamp"} <= set(body) and body["statusCode"] == 404


def test_bearer_key_guards_api_toolbox_and_events(emulator, client):
    sandbox = make(client)
    with pytest.raises(daytona.DaytonaAuthenticationError):
        list(emulator.client(api_key="wrong-key").list())
    for url in (f"{emulator.api_url}/sandbox", f"{sandbox.toolbox_proxy_url}/{sandbox.id}/user-home-dir"):
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong-key"}).status_code == 401
    outsider = emulator.client(api_key="wrong-key")
    outsider._event_dispatcher.ensure_connected()
    time.sleep(0.5)
    assert not outsider._event_dispatcher.is_connected and outsider._event_dispatcher.is_failed


def test_another_organization_sees_nothing():
    with running_emulator("--api-key", "key-b:org-b") as emulator:
        mine, theirs = emulator.client(), emulator.client(api_key="key-b")
        sandbox = make(mine, name="private")
        with pytest.raises(daytona.DaytonaNotFoundError):
            theirs.get(sandbox.id)
        assert list(theirs.list()) == []
        assert httpx.get(f"{sandbox.toolbox_proxy_url}/{sandbox.id}/user-home-dir",
                         headers={"Authorization": "Bearer key-b"}).status_code == 404
        make(theirs, name="private")  # names are per organization


def test_stop_and_start_keep_the_files(emulator, client):
    sandbox = make(client)
    sandbox.fs.upload_files([FileUpload(source=b"kept", destination="keep/me.txt")])
    sandbox.stop(timeout=30)
    assert sandbox.state.value == "stopped"
    with pytest.raises(daytona.DaytonaError) as caught:
        sandbox.process.exec("true")
    assert (caught.value.status_code, caught.value.code) == (400, "SANDBOX_NOT_RUNNING")
    sandbox.start(timeout=30)
    assert sandbox.state.value == "started"
    assert sandbox.fs.download_file("keep/me.txt") == b"kept"


def test_auto_stop_refresh_activity_auto_delete_and_ttl(emulator, client):
    idle = make(client, auto_stop_interval=1, auto_delete_interval=-1)
    busy = make(client, auto_stop_interval=1, auto_delete_interval=-1)
    ephemeral = make(client, auto_stop_interval=1, auto_delete_interval=0)
    capped = make(client, auto_stop_interval=0, ttl_minutes=2)
    busy.refresh_activity()
    emulator.clock(minute=0.6)  # from now on one Daytona minute is 0.6 s
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        busy.refresh_activity()
        time.sleep(0.1)
    states = {s["id"]: s["state"] for s in emulator.sandboxes()}
    assert states[idle.id] == "stopped"
    assert states[busy.id] == "started"  # refresh_activity reset its timer
    assert ephemeral.id not in states  # deleted as soon as it stopped
    assert wait_until(lambda: capped.id not in {s["id"] for s in emulator.sandboxes()}, timeout=3)
    with pytest.raises(daytona.DaytonaNotFoundError):
        client.get(capped.id)  # the TTL destroyed it although auto-stop was off


def test_preview_links_reach_each_sandboxs_own_8765(emulator, client):
    one, two = make(client), make(client)
    for sandbox in (one, two):
        serve_identity(sandbox)
    links = {sandbox.id: sandbox.get_preview_link(8765) for sandbox in (one, two)}
    for sandbox_id, link in links.items():
        status, body = wait_until(lambda link=link: (lambda r: r if r[0] == 200 else None)(
            fetch(f"{link.url}/who.txt", {"X-Daytona-Preview-Token": link.token})), timeout=15)
        assert (status, body) == (200, sandbox_id.encode())
    link = links[one.id]
    assert fetch(f"{link.url}/who.txt")[0] == 401
    assert fetch(f"{link.url}/who.txt", {"X-Daytona-Preview-Token": links[two.id].token})[0] == 401
    redirect = httpx.get(f"{link.url}/who.txt", headers={"Accept": "text/html"})
    assert redirect.status_code == 307 and "sign-in" in redirect.headers["location"]
    assert fetch(f"{link.url}/who.txt", {"Authorization": f"Bearer {emulator.api_key}"}) == (200, one.id.encode())
    closed = one.get_preview_link(9999)
    assert fetch(f"{closed.url}/", {"X-Daytona-Preview-Token": closed.token})[0] == 502
    signed = one.create_signed_preview_url(8765, expires_in_seconds=60)
    assert fetch(f"{signed.url}/who.txt") == (200, one.id.encode())
    one.expire_signed_preview_url(8765, signed.token)
    assert fetch(f"{signed.url}/who.txt")[0] == 401


# ---------------------------------------------------------------- the toolbox

def test_home_work_dir_exec_and_code_run(emulator, client):
    sandbox = make(client)
    assert sandbox.get_user_home_dir() == "/home/daytona" and sandbox.get_work_dir() == "/home/daytona"
    result = sandbox.process.exec("echo $GREETING from $(pwd); id -u; exit 3", cwd="/tmp", env={"GREETING": "hi"})
    assert (result.exit_code, result.result.split()) == (3, ["hi", "from", "/tmp", "1000"])
    quoted = sandbox.process.exec("sh -c 'python3 -c \"import flask\" && echo flask ok'")
    assert quoted.exit_code == 0 and "flask ok" in quoted.result
    with pytest.raises(daytona.DaytonaTimeoutError, match="timed out"):
        sandbox.process.exec("sleep 30", timeout=1)
    run = sandbox.process.code_run("import sys\nprint('args', sys.argv[1:])")
    assert run.exit_code == 0 and run.result.strip() == "args []"


def test_sessions_run_in_order_report_status_and_logs(emulator, client):
    sandbox = make(client)
    sandbox.process.create_session("s1")
    with pytest.raises(daytona.DaytonaError) as caught:
        sandbox.process.create_session("s1")
    assert caught.value.status_code == 409
    first = sandbox.process.execute_session_command("s1", SessionExecuteRequest(command="cd /tmp && export X=7"))
    assert first.exit_code == 0
    same_shell = sandbox.process.execute_session_command(
        "s1", SessionExecuteRequest(command="echo $PWD $X; echo e >&2"))
    assert (same_shell.stdout, same_shell.stderr) == ("/tmp 7\n", "e\n")
    background = sandbox.process.execute_session_command(
        "s1", SessionExecuteRequest(command="sleep 0.5; echo done; (exit 4)", run_async=True))
    assert background.exit_code is None
    assert sandbox.process.get_session_command("s1", background.cmd_id).exit_code is None
    finished = wait_until(lambda: sandbox.process.get_session_command("s1", background.cmd_id).exit_code is not None)
    assert finished and sandbox.process.get_session_command("s1", background.cmd_id).exit_code == 4
    logs = sandbox.process.get_session_command_logs("s1", background.cmd_id)
    assert (logs.stdout, logs.output) == ("done\n", "done\n")
    session = sandbox.process.get_session("s1")
    assert [c.id for c in session.commands][-1] == background.cmd_id
    assert [s.session_id for s in sandbox.process.list_sessions()] == ["s1"]
    sandbox.process.execute_session_command("s1", SessionExecuteRequest(command="sleep 300 &", run_async=False))
    sandbox.process.delete_session("s1")
    alive = sandbox.process.exec("for p in /proc/[0-9]*; do cat $p/cmdline; echo; done | grep -c '^sleep' || true")
    assert alive.result.strip() == "0"  # deleting the session killed what it started
    with pytest.raises(daytona.DaytonaNotFoundError):
        sandbox.process.get_session("s1")


def test_files_folder_upload_list_info_download_delete(emulator, client):
    sandbox = make(client)
    sandbox.fs.create_folder("data/deep", "750")
    payloads = {f"data/deep/f{i}.bin": secrets.token_bytes(1000 * (i + 1)) for i in range(3)}
    payloads["data/name with ünïcode.txt"] = "ünïcode".encode()
    sandbox.fs.upload_files([FileUpload(source=data, destination=path) for path, data in payloads.items()])
    sandbox.fs.upload_files([FileUpload(source=b"x" * (3 * 1024 * 1024), destination="/home/daytona/big/blob")])
    listing = {f.name: f for f in sandbox.fs.list_files("data/deep")}
    assert set(listing) == {"f0.bin", "f1.bin", "f2.bin"} and listing["f1.bin"].size == 2000
    folder = sandbox.fs.get_file_info("data/deep")
    assert folder.is_dir and folder.permissions == "0750" and folder.owner == "daytona"
    for path, data in payloads.items():
        assert sandbox.fs.download_file(path) == data
    assert len(sandbox.fs.download_file("big/blob")) == 3 * 1024 * 1024
    results = sandbox.fs.download_files([FileDownloadRequest(source="data/deep/f0.bin"),
                                         FileDownloadRequest(source="data/missing.txt")])
    assert results[0].result == payloads["data/deep/f0.bin"] and results[0].error is None
    assert "not found" in results[1].error and results[1].error_details.status_code == 404
    with pytest.raises(daytona.DaytonaError):
        sandbox.fs.delete_file("data")  # not empty, not recursive
    sandbox.fs.delete_file("data", recursive=True)
    with pytest.raises(daytona.DaytonaNotFoundError):
        sandbox.fs.get_file_info("data/deep/f0.bin")


def test_interpreter_contexts_stream_and_close_with_daytonas_codes(emulator, client):
    sandbox = make(client)
    context = sandbox.code_interpreter.create_context(cwd="/tmp")
    assert context.active and context.cwd == "/tmp"
    seen = []
    first = sandbox.code_interpreter.run_code(
        "import os, sys\nx = 41\nprint(os.getcwd())\nprint('warn', file=sys.stderr)", context=context,
        on_stdout=lambda m: seen.append(m.output))
    assert (first.stdout, first.stderr, first.error) == ("/tmp\n", "warn\n", None) and seen == ["/tmp\n"]
    second = sandbox.code_interpreter.run_code("print(x + 1)\n1/0", context=context)
    assert second.stdout == "42\n" and second.error.name == "ZeroDivisionError"
    assert sandbox.code_interpreter.run_code("print(x)").error.name == "NameError"  # the default context is another
    assert [c.id for c in sandbox.code_interpreter.list_contexts()] == [context.id]

    started = time.monotonic()
    with pytest.raises(daytona.DaytonaTimeoutError, match="timed out"):  # close 4008
        sandbox.code_interpreter.run_code("import time\nwhile True: time.sleep(0.1)", context=context, timeout=1)
    assert time.monotonic() - started < 6
    caught_interrupt = sandbox.code_interpreter.create_context()
    swallowed = sandbox.code_interpreter.run_code(  # the SIGINT is caught by the code: a normal close (1000)
        "import time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    print('caught')",
        context=caught_interrupt, timeout=1)
    assert swallowed.stdout == "caught\n"

    sandbox.code_interpreter.delete_context(caught_interrupt)
    with pytest.raises(daytona.DaytonaConnectionError, match=r"context not found.*1008"):
        sandbox.code_interpreter.run_code("print(1)", context=caught_interrupt)

    stalled = sandbox.code_interpreter.create_context()
    started = time.monotonic()
    with pytest.raises(daytona.DaytonaTimeoutError):  # a line over 1 MiB stalls the daemon's reader until the timeout
        sandbox.code_interpreter.run_code("print('y' * (1024 * 1024 + 10))\nprint('never seen')", context=stalled,
                                          timeout=2)
    assert 1.5 < time.monotonic() - started < 8


def test_interpreter_context_whose_worker_died_closes_with_1001_then_1008(emulator, client):
    sandbox = make(client)
    context = sandbox.code_interpreter.create_context()
    with pytest.raises(daytona.DaytonaConnectionError, match=r"worker process ended.*1001"):
        sandbox.code_interpreter.run_code("import os\nos._exit(3)", context=context)
    with pytest.raises(daytona.DaytonaConnectionError, match=r"context is not active.*1008"):
        sandbox.code_interpreter.run_code("print(1)", context=context)


def test_async_client_drives_the_same_paths(emulator):
    async def scenario():
        async with AsyncDaytona(DaytonaConfig(api_key=emulator.api_key, api_url=emulator.api_url)) as client:
            sandbox = await client.create(CreateSandboxFromSnapshotParams(labels={"async": "yes"}), timeout=60)
            result = await sandbox.process.exec("echo async")
            ran = await sandbox.code_interpreter.run_code("print(6 * 7)")
            found = [s.id async for s in client.list(ListSandboxesQuery(labels={"async": "yes"}))]
            await sandbox.delete()
            return result.result, ran.stdout, found, sandbox.id

    output, printed, found, sandbox_id = asyncio.run(scenario())
    assert (output, printed, found) == ("async\n", "42\n", [sandbox_id])


# ---------------------------------------------------------------- fault knobs

def test_latency_failures_and_rate_limits_on_the_next_calls(emulator, client):
    sandbox = make(client)
    emulator.faults(latency={"api": 0.3})
    started = time.monotonic()
    client.get(sandbox.id)
    assert time.monotonic() - started >= 0.3
    emulator.clear_faults()

    emulator.faults(fail=[{"scope": "api", "status": 503, "count": 2, "path": "/api/sandbox"}])
    for _ in range(2):
        with pytest.raises(daytona.DaytonaError) as caught:
            client.get(sandbox.id)
        assert caught.value.status_code == 503
    assert client.get(sandbox.id).id == sandbox.id  # the third call goes through

    emulator.faults(fail=[{"scope": "api", "status": 429, "count": 1, "retry_after": 7}])
    with pytest.raises(daytona.DaytonaRateLimitError) as caught:
        make(client)
    assert {k.lower(): v for k, v in caught.value.headers.items()}["retry-after"] == "7"

    emulator.faults(fail=[{"scope": "toolbox", "status": 500, "count": 1}])
    with pytest.raises(daytona.DaytonaError) as caught:
        sandbox.process.exec("true")
    assert caught.value.status_code == 500 and caught.value.source == "DAYTONA_PROXY"
    assert sandbox.process.exec("true").exit_code == 0


def test_cpu_quota_is_a_403():
    with running_emulator("--cpu-quota", "1") as emulator:
        client = emulator.client()
        first = make(client)
        with pytest.raises(daytona.DaytonaForbiddenError, match=re.escape("Total CPU limit exceeded. Maximum allowed: 1")):
            make(client)
        first.stop()
        make(client)  # a stopped sandbox uses no CPU


def test_a_hung_api_holds_requests_until_released(emulator, client):
    sandbox = make(client)
    emulator.faults(hang=["api"])
    started = time.monotonic()
    with pytest.raises(daytona.DaytonaError):  # the SDK's own request timeout, the only bound a caller has
        client.get(sandbox.id, request_timeout=1)
    assert 0.9 < time.monotonic() - started < 5
    answer: dict[str, str] = {}
    waiter = threading.Thread(target=lambda: answer.update(id=client.get(sandbox.id).id))
    waiter.start()
    time.sleep(0.3)
    assert not answer  # still held
    emulator.clear_faults()
    waiter.join(10)
    assert answer == {"id": sandbox.id}


def test_a_lost_create_reply_still_makes_the_sandbox(emulator, client):
    emulator.faults(lose_create=1)
    with pytest.raises(daytona.DaytonaError):
        make(client, name="lost-reply", labels={"rlmq.run": "lost"})
    found = list(client.list(ListSandboxesQuery(labels={"rlmq.run": "lost"})))
    assert [s.name for s in found] == ["lost-reply"]  # created: only a reaper by name or label finds it


def test_killing_the_agent_breaks_the_sandbox(emulator, client):
    sandbox = make(client)
    context = sandbox.code_interpreter.create_context()
    running: dict[str, Exception | None] = {}
    thread = threading.Thread(target=lambda: running.update(
        error=_raises(lambda: sandbox.code_interpreter.run_code("import time\ntime.sleep(60)", context=context))))
    thread.start()
    time.sleep(0.5)
    emulator.kill(sandbox.id, "agent")
    thread.join(15)
    assert isinstance(running.get("error"), daytona.DaytonaError)
    assert wait_until(lambda: client.get(sandbox.id).state.value == "error")
    with pytest.raises(daytona.DaytonaError, match="not running"):
        sandbox.process.exec("true")


def _processes() -> dict[int, tuple[int, str, bytes]]:
    """Every process here: pid -> (parent pid, start time, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                found[int(entry.name)] = (int(fields[1]), fields[19], (entry / "cmdline").read_bytes())
            except (OSError, IndexError, ValueError):
                continue
    return found


def _tree(root: int) -> dict[int, tuple[int, str, bytes]]:
    """The descendants of ``root``, as ``_processes`` describes them."""
    processes, tree = _processes(), {root}
    while more := {pid for pid, (parent, _, _) in processes.items() if parent in tree} - tree:
        tree |= more
    return {pid: processes[pid] for pid in tree - {root}}


def _survivors(tree: dict[int, tuple[int, str, bytes]]) -> list[bytes]:
    """The command lines of those still running (same pid and start time: a reused pid is another process)."""
    now = _processes()
    return [now[pid][2] for pid, (_, started, _) in tree.items() if pid in now and now[pid][1] == started]


def test_a_sigkilled_emulator_takes_its_sandboxes_with_it():
    """SIGKILL, so none of the emulator's cleanup runs: a started sandbox dies with it, and so does one
    still in bubblewrap's setup, before bwrap arms --die-with-parent in the sandbox's own init (such a
    one once outlived a CI run, reparented to PID 1, its agent running)."""
    with running_emulator() as emulator:
        started = make(emulator.client())
        assert started.process.exec("true").exit_code == 0
        emulator.faults(hold_start=True)
        reply = httpx.post(f"{emulator.api_url}/sandbox", json={"name": "held"}, timeout=30,
                           headers={"Authorization": f"Bearer {emulator.api_key}"})
        assert reply.status_code == 200, reply.text

        def bwraps() -> int:
            return sum(command.split(b"\0")[0].endswith(b"/bwrap") for _, _, command in
                       _tree(emulator.process.pid).values())

        assert wait_until(lambda: bwraps() == 4, timeout=15), "two bwraps per sandbox: outside and its init"
        tree = _tree(emulator.process.pid)
        # its own state directory (sandbox homes; --state-dir not given) and its agents' sockets' directory
        state_dir = next(Path(a.decode()).parent for _, _, command in tree.values()
                         for a in command.split(b"\0") if a.endswith(b"/opt") and b"daytona-emulator-" in a)
        run_dir = next(Path(line.split()[-1]).parent for line in Path("/proc/net/unix").read_text().splitlines()
                       if line.endswith(f"/{started.id}.sock"))
        assert state_dir.is_dir() and run_dir.is_dir()
        emulator.process.kill()
        emulator.process.wait()
        wait_until(lambda: not _survivors(tree), timeout=10)
        assert _survivors(tree) == []
        assert wait_until(lambda: not state_dir.exists() and not run_dir.exists(), timeout=15), \
            f"left on disk: {[str(d) for d in (state_dir, run_dir) if d.exists()]}"


def test_preview_latency_slows_only_preview_requests(emulator, client):
    sandbox = make(client)
    serve_identity(sandbox)
    link = sandbox.get_preview_link(8765)
    headers = {"X-Daytona-Preview-Token": link.token}
    assert wait_until(lambda: fetch(f"{link.url}/who.txt", headers)[0] == 200, timeout=15)
    emulator.faults(latency={"preview": 1.0})
    started = time.monotonic()
    assert fetch(f"{link.url}/who.txt", headers)[0] == 200
    assert time.monotonic() - started >= 1.0
    started = time.monotonic()
    sandbox.get_user_home_dir()  # the toolbox goes through the same server, without the delay
    assert time.monotonic() - started < 0.8


def _raises(call: Callable[[], object]) -> Exception | None:
    try:
        call()
    except Exception as exc:
        return exc
    return None


# ---------------------------------------------------------------- isolation

HOSTILE = r"""
import glob, os, socket, sys
found = []
canary = bytes.fromhex(sys.argv[1]).decode()  # hex: the canary itself is on no command line or file here
host_paths, port = sys.argv[2].split(","), int(sys.argv[3])
for path in glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline"):
    try:
        if canary.encode() in open(path, "rb").read():
            found.append(path)
    except OSError:
        pass
if canary in "".join(os.environ.values()):
    found.append("environ")
for path in host_paths:
    if os.path.exists(path):
        found.append(path)
system = ("/proc", "/sys", "/dev", "/usr", "/bin", "/sbin", "/lib", "/opt/rlmq", sys.base_prefix)
for root, dirs, files in os.walk("/", onerror=lambda e: None):
    if root.startswith(system):  # read-only system files and the Python: the same as the host's
        dirs[:] = []
        continue
    for name in files:
        try:
            if canary.encode() in open(os.path.join(root, name), "rb").read(1 << 20):
                found.append(os.path.join(root, name))
        except OSError:
            pass
for host in ("127.0.0.1", "::1"):
    try:
        socket.create_connection((host, port), timeout=1).close()
        found.append(f"connected to {host}:{port}")
    except OSError:
        pass
print("FOUND", found)
print("PIDS", sorted(int(p) for p in os.listdir("/proc") if p.isdigit())[:5])
"""


def test_hostile_code_reads_no_canary_and_reaches_no_host_loopback(tmp_path, listener):
    canary = "rlmq-canary-" + secrets.token_hex(12)
    state = tmp_path / "state"
    state.mkdir()
    (state / "canary.txt").write_text(canary)
    (tmp_path / ".env").write_text(f"SECRET={canary}\n")
    with running_emulator("--state-dir", str(state), cwd=tmp_path,
                          env={"PYTHONPATH": str(REPO), "RLMQ_CANARY": canary}) as emulator:
        client = emulator.client()
        victim, attacker = make(client), make(client)
        victim.fs.upload_files([FileUpload(source=b"victim data", destination="secret.txt")])
        paths = ",".join([str(state), str(tmp_path / ".env"), str(Path(emulator.sandboxes()[0]["home"]))])
        attacker.fs.upload_files([FileUpload(source=HOSTILE.encode(), destination="hostile.py")])
        shell = attacker.process.exec(f"python3 hostile.py {canary.encode().hex()} {paths} {listener}", timeout=120)
        assert shell.exit_code == 0, shell.result
        assert "FOUND []" in shell.result, shell.result
        assert "PIDS [1, 2" in shell.result  # its own pid namespace: the agent is pid 2
        interpreted = attacker.code_interpreter.run_code(
            f"import sys\nsys.argv = ['x', {canary.encode().hex()!r}, {paths!r}, '{listener}']\n" + HOSTILE)
        assert "FOUND []" in interpreted.stdout, interpreted
        assert emulator.api_key not in attacker.process.exec("env").result
        assert attacker.process.exec("cat /home/daytona/secret.txt").exit_code != 0  # not the victim's home
