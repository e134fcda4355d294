"""Bad input to the local sandbox: each gives a clear error and leaves no process or directory behind."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from dspy.primitives.code_interpreter import CodeExecutionError

from broker_bridge import SandboxDied, SandboxTimeout
from broker_bridge.backends.process_jail import pids_with_marker, process_cap_available
from broker_bridge.sandbox.protocol import HOST_TOKEN_HEADER
from tests.support.sandboxes import assert_local_sandbox_gone, started_local

FAKE_SECRET = "sk-rlmq-test-secret-do-not-leak-4242"


@pytest.fixture
def sandbox():
    interpreter, sandbox_id, runtime_dir = started_local(execution_timeout=20)
    yield interpreter
    interpreter.shutdown()
    assert_local_sandbox_gone(sandbox_id, runtime_dir)


def _kernel_pid(sandbox_id: str) -> int:
    for pid in pids_with_marker(sandbox_id):
        program, *rest = psutil.Process(pid).cmdline()
        if any("kernel.py" in arg for arg in rest) and not program.endswith("bwrap"):  # the Python, not its bwrap
            return pid
    raise AssertionError("no kernel process found")


def test_printing_100_mb_is_capped_with_a_statement(sandbox_pool):
    with sandbox_pool.lend("local") as sandbox:
        out = sandbox.execute("print('x' * 100_000_000)\nprint('after')")
        assert "output capped" in out and "characters not shown" in out
        assert len(out) < 20_000
        assert sandbox.execute("print('still alive')") == "still alive"


@pytest.mark.slow  # waits out a timeout: not for the fast lane
def test_infinite_loop_times_out_and_kills_the_sandbox():
    interpreter, sandbox_id, runtime_dir = started_local(execution_timeout=1.5)
    with pytest.raises(SandboxTimeout, match=r"exceeded the 1\.5s limit"):
        interpreter.execute("while True:\n    pass")
    assert_local_sandbox_gone(sandbox_id, runtime_dir)
    interpreter.shutdown()


@pytest.mark.skipif(
    not process_cap_available(),
    reason="running as root without a writable pids cgroup: nothing can cap a fork bomb here",
)
def test_fork_bomb_is_capped_and_leaves_nothing(sandbox):
    with pytest.raises(CodeExecutionError, match=r"BlockingIOError|Resource temporarily unavailable"):
        sandbox.execute("import os\nwhile True:\n    os.fork()")
    assert sandbox.execute("print('survived')") == "survived"


def test_os_exit_is_a_clear_terminal_error(sandbox):
    with pytest.raises(SandboxDied, match=r"exited unexpectedly \(exit code 1\)"):
        sandbox.execute("import os\nos._exit(1)")
    with pytest.raises(SandboxDied, match="cannot be used again"):
        sandbox.execute("print(1)")


def test_kernel_killed_from_outside_is_a_clear_terminal_error(sandbox):
    sandbox.execute("x = 1")
    os.kill(_kernel_pid(sandbox.sandbox_id), signal.SIGKILL)
    with pytest.raises(SandboxDied, match="exit"):
        sandbox.execute("print(x)")


def test_sandbox_code_cannot_find_the_host_token_or_use_the_host_endpoints(sandbox):
    host_token = sandbox._client._headers[HOST_TOKEN_HEADER]  # the secret under test
    # The sandbox reports digests of every word it can find in its environment, its files and its
    # processes' command lines and environments; the host token must not be among them.
    out = sandbox.execute(
        "import hashlib, os, re\n"
        "words = set()\n"
        "def add(text):\n"
        "    words.update(re.split(r'[\\s\\x00=\"\\',:]+', text))\n"
        "add(' '.join(f'{k}={v}' for k, v in os.environ.items()))\n"
        "for root in {os.environ['HOME'], os.getcwd()}:\n"
        "    for dirpath, _, names in os.walk(root):\n"
        "        for name in names:\n"
        "            add(open(os.path.join(dirpath, name), errors='replace').read())\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    for part in ('cmdline', 'environ'):\n"
        "        try:\n"
        "            add(open(f'/proc/{pid}/{part}', errors='replace').read())\n"
        "        except OSError:\n"
        "            pass\n"
        "print(len(words))\n"
        "digests = {hashlib.sha256(w.encode()).hexdigest() for w in words}\n"
    )
    assert int(out) > 10
    digests = sandbox.execute("sorted(digests)")
    assert hashlib.sha256(host_token.encode()).hexdigest() not in digests
    # A call to a host endpoint with the sandbox's token (or none) is refused, and the session lives on.
    refused = sandbox.execute(
        "import protocol\n"  # the runtime's own way to the broker: a Unix socket or a loopback port
        "for headers in ({}, __rlmq.broker.headers, {'X-Rlmq-Host-Token': 'guess'}):\n"
        "    conn, prefix = protocol.broker_connection(__rlmq.broker.url, 5)\n"
        "    conn.request('GET', prefix + '/host/poll?wait=0', headers=headers)\n"
        "    response = conn.getresponse()\n"
        "    print(response.status, response.read().decode())\n"
        "    conn.close()\n"
    )
    assert refused.splitlines() == ['403 {"error":"invalid or missing host token"}'] * 3


HOST_SCRIPT = """
import hashlib, os, sys
from broker_bridge import interpreter_factory
interpreter = interpreter_factory("local")()
wanted = hashlib.sha256(os.environ["OPENAI_API_KEY"].encode()).hexdigest()
try:
    print(interpreter.execute(sys.argv[1], {"wanted": wanted}))
finally:
    interpreter.shutdown()
"""

SCAN_CODE = """
import hashlib, os
texts = [f"{k}={v}" for k, v in os.environ.items()]
readable = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    for part in ("environ", "cmdline"):
        try:
            texts.append(open(f"/proc/{pid}/{part}", errors="replace").read())
            readable += 1
        except OSError:
            pass
for dirpath, _, names in os.walk(os.environ["HOME"]):
    texts += [open(os.path.join(dirpath, n), errors="replace").read() for n in names]
names = sorted(k for k in os.environ if any(p in k for p in ("KEY", "TOKEN", "SECRET")))
found = any(hashlib.sha256(w.encode()).hexdigest() == wanted
            for t in texts for w in t.replace("\\x00", " ").replace("=", " ").split())
print(names, found, readable > 0)
"""


def test_no_host_secret_reaches_the_sandbox_environment_files_or_host_memory(tmp_path):
    # The host runs in its own process whose *initial* environment holds the keys, as a worker's does.
    env = dict(os.environ)
    for name in ("OPENAI_API_KEY", "DAYTONA_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "RLMQ_LM_API_KEY"):
        env[name] = FAKE_SECRET
    result = subprocess.run(
        [sys.executable, "-c", HOST_SCRIPT, SCAN_CODE],
        env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] False True"


def test_ctrl_c_on_the_host_during_execute_releases_the_sandbox():
    interpreter, sandbox_id, runtime_dir = started_local(execution_timeout=60)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            interpreter.execute("import time\ntime.sleep(30)")
    finally:
        timer.cancel()
    assert_local_sandbox_gone(sandbox_id, runtime_dir)
    with pytest.raises(SandboxDied, match="interrupted by KeyboardInterrupt"):
        interpreter.execute("print(1)")
    interpreter.shutdown()
