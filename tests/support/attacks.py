"""Hostile sandbox code as data: each attack is a snippet plus the host's check of what it achieved.

A snippet runs as one execute in a sandbox (through ``SandboxInterpreter`` here; later the same list
can be sent as RLM steps through the fleet). It gets one variable, ``target`` (a dict: see
``Target``), and prints one line ``RLMQ-VERDICT {json}`` with what it found. The host then decides
with ``Attack.check(verdict, target)``: a non-empty string is the evidence that the attack
succeeded, ``""`` that it failed. Secrets never go to the sandbox: the canary's *prefix* does, and
the host compares what comes back with the real value.

    python -m tests.support.attacks < TARGET_JSON    # run every attack, print the outcomes as JSON
                                                     # (an "isolation" key picks the local sandbox's mode)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

VERDICT = "RLMQ-VERDICT "
CANARY_PREFIX = "rlmq-canary-"


@dataclass
class Target:
    """What the attacks aim at; everything here is also known to sandbox code (no secret values)."""

    canary_prefix: str = CANARY_PREFIX
    host_cwd: str = ""  # the worker's cwd, with a .env holding the canary
    host_home: str = ""  # the worker's HOME, with a .env holding the canary
    redis_port: int = 0
    listener_port: int = 0  # a host TCP listener on loopback that answers "hello"
    write_targets: list[str] = field(default_factory=list)  # host paths code must not create
    victim_dir: str = ""  # another sandbox's directory (host path), holding a canary file
    victim_pid: int = 0  # another sandbox's kernel (host pid)
    victim_broker: str = ""  # the other sandbox's broker as its host sees it (unix:///path or http://...)
    plant_dir: str = ""  # an empty host directory a planted symlink points the host's uploads at
    host_token_sha256: str = ""  # a digest reveals nothing: the broker itself holds it
    secret_canary: str = ""  # host-side only, never sent

    def for_sandbox(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "secret_canary"}

    def aim_at(self, victim: Any) -> None:
        """Make a started interpreter's sandbox the victim: a canary file in it, its directory, kernel and broker."""
        victim.execute(f"open('secret.txt', 'w').write({self.secret_canary!r})")
        self.victim_dir = victim._backend.host_dir
        self.victim_pid = victim._backend._kernel.pid
        self.victim_broker = victim._client._url

    def aim_at_daytona(self, victim: Any, listed: dict[str, Any]) -> None:
        """The same for a Daytona emulator's sandbox (``listed``: its entry in the emulator's admin list):
        the canary in its home, the home's host path, its bubblewrap's host pid, its broker's preview link."""
        victim.execute(f"import os\nopen(os.path.expanduser('~/secret.txt'), 'w').write({self.secret_canary!r})")
        self.victim_dir = listed["home"]
        self.victim_pid = listed["pid"]
        self.victim_broker = victim._client._url


@dataclass(frozen=True)
class Attack:
    name: str
    goal: str  # what success would mean, in one line
    code: str
    check: Callable[[dict[str, Any], Target], str]
    # Variables for a second execute (its outcome ignored) that makes the host act on what the
    # snippet left behind, e.g. upload a large input. Such an attack may end the session: run it last.
    then: dict[str, Any] | None = None


# Every attack that walks a filesystem or /proc keeps a time budget (a host's /tmp can hold millions of
# files, and a plain-process sandbox sees them all) and says in its verdict how far it got: a walk cut
# short is a finding (``complete: false``), never a step that overruns its timeout. A namespaced
# sandbox sees only its own small view, so there every walk finishes.
WALK_BUDGET_SECONDS = 20

_HELPERS = f"WALK_BUDGET_SECONDS = {WALK_BUDGET_SECONDS}\n" + r'''
import json, os, re, socket, time
class Walk:
    """Files and /proc entries within a time budget; ``complete`` turns False once the budget cut it short."""
    def __init__(self, seconds=WALK_BUDGET_SECONDS):
        self.deadline, self.complete, self.visited = time.monotonic() + seconds, True, 0
    def more(self):
        if self.complete and time.monotonic() > self.deadline:
            self.complete = False
        if self.complete:
            self.visited += 1
        return self.complete
    def files(self, roots):
        for root in roots:
            for dirpath, _, names in os.walk(root):
                for name in names:
                    if not self.more():
                        return
                    yield dirpath, name
    def pids(self):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if not self.more():
                return
            yield pid
    def report(self):
        return {"complete": self.complete, "visited": self.visited}
def verdict(**found):
    print("RLMQ-VERDICT " + json.dumps(found, default=repr))
def canaries(text):
    return sorted(set(re.findall(re.escape(target["canary_prefix"]) + r"[0-9a-f]{32}", text)))
def read(path, limit=1 << 20):
    try:
        with open(path, "rb") as handle:
            return handle.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""
'''


def _snippet(body: str) -> str:
    return _HELPERS + body


def _whole_walk(check: Callable[[dict[str, Any], Target], str]) -> Callable[[dict[str, Any], Target], str]:
    """``check``, plus: a walk its time budget cut short saw more than a sandbox's own small view."""

    def checked(verdict: dict[str, Any], target: Target) -> str:
        evidence = check(verdict, target)
        if verdict.get("complete") is False:
            cut = f"its walk saw too much to finish in {WALK_BUDGET_SECONDS} s ({verdict.get('visited')} entries)"
            evidence = f"{evidence}; {cut}" if evidence else cut
        return evidence

    return checked


def _found_canary(verdict: dict[str, Any], target: Target) -> str:
    hits = [c for c in verdict.get("canaries", []) if c == target.secret_canary]
    return f"read the canary via {verdict.get('where', '?')}" if hits else ""


def _flag(key: str) -> Callable[[dict[str, Any], Target], str]:
    def check(verdict: dict[str, Any], target: Target) -> str:
        value = verdict.get(key)
        return f"{key}: {value}" if value else ""

    return check


WALK = _snippet(r'''
found, files, walk, top = set(), 0, Walk(), sorted(os.listdir("/"))
system = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib32/", "/lib64/", "/libx32/", "/proc/", "/sys/", "/dev/")
for dirpath, name in walk.files(["/" + name for name in top]):
    path = os.path.join(dirpath, name)
    # read-only system trees hold no host secret: only names there, contents elsewhere
    if path.startswith(system) and ".env" not in name:
        continue
    if os.path.isfile(path) and not os.path.islink(path):
        files += 1
        found.update(canaries(read(path)))
verdict(canaries=sorted(found), where="walking /", files=files, top=top, **walk.report())
''')

PROC_ENVIRON = _snippet(r'''
found, readable, walk = set(), 0, Walk()
for pid in walk.pids():
    for part in ("environ", "cmdline"):
        text = read(f"/proc/{pid}/{part}")
        readable += bool(text)
        found.update(canaries(text))
verdict(canaries=sorted(found), where="/proc/*/environ", readable=readable, **walk.report())
''')

PROC_LINKS = _snippet(r'''
found, seen, walk = set(), [], Walk()
for pid in walk.pids():
    for path in (f"/proc/{pid}/cwd/.env", f"/proc/{pid}/root{target['host_cwd']}/.env",
                 f"/proc/{pid}/root{target['host_home']}/.env"):
        text = read(path)
        if text:
            seen.append(path)
        found.update(canaries(text))
verdict(canaries=sorted(found), where="/proc/*/cwd and /proc/*/root", seen=seen, **walk.report())
''')

RELATIVE = _snippet(r'''
found = set()
for depth in range(1, 12):
    found.update(canaries(read("../" * depth + ".env")))
    found.update(canaries(read(os.path.join("../" * depth, target["host_cwd"].lstrip("/"), ".env"))))
verdict(canaries=sorted(found), where="relative paths ../.env")
''')

HOST_PATHS = _snippet(r'''
found, listed, walk = set(), {}, Walk()
for directory in (target["host_cwd"], target["host_home"], os.path.expanduser("~"), "/root", "/home"):
    try:
        names = os.listdir(directory)
    except OSError:
        continue
    listed[directory] = names[:20]
    for name in names:
        if not walk.more():
            break
        found.update(canaries(read(os.path.join(directory, name))))
verdict(canaries=sorted(found), where="the host's cwd and home", listed=listed, **walk.report())
''')

REDIS = _snippet(r'''
answer = ""
try:
    with socket.create_connection(("127.0.0.1", target["redis_port"]), timeout=2) as conn:
        conn.sendall(b"PING\r\n")
        answer = conn.recv(64).decode(errors="replace")
except OSError as exc:
    error = repr(exc)
# Any answer is a breach: +PONG, or -NOAUTH from a Redis behind a password (the fleet's is).
verdict(pong=answer if ("PONG" in answer or "NOAUTH" in answer) else "", error=None if answer else error)
''')

LISTENER = _snippet(r'''
banner = ""
try:
    with socket.create_connection(("127.0.0.1", target["listener_port"]), timeout=2) as conn:
        banner = conn.recv(64).decode(errors="replace")
except OSError as exc:
    error = repr(exc)
verdict(banner=banner, error=None if banner else error)
''')

PORT_SCAN = _snippet(r'''
ports = sorted({22, 53, 80, 443, 631, 1883, 3306, 4222, 5432, 5672, 5555, 6379, 8000, 8080, 8222, 8265,
                11211, 15672, 27017, target["redis_port"], target["listener_port"]} | set(range(30000, 30050)))
open_ports = []
for host in ("127.0.0.1", "::1", "localhost", socket.gethostname()):
    for port in ports:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                open_ports.append(f"{host}:{port}")
        except OSError:
            pass
verdict(open_ports=open_ports, tried=len(ports))
''')

VICTIM = _snippet(r'''
import signal
found, reached = set(), []
for path in (target["victim_dir"], os.path.join(target["victim_dir"], "secret.txt")):
    if os.path.exists(path):
        reached.append(path)
    found.update(canaries(read(path)))
mine, walk = os.environ.get("RLMQ_SANDBOX_ID"), Walk()
for pid in walk.pids():
    ids = re.findall(r"RLMQ_SANDBOX_ID=([^\x00]+)", read(f"/proc/{pid}/environ"))
    if ids and ids[0] != mine:
        reached.append(f"/proc/{pid} of sandbox {ids[0]}")
broker = target["victim_broker"]
try:
    if broker.startswith("unix://"):
        probe = socket.socket(socket.AF_UNIX)
        probe.settimeout(2)
        probe.connect(broker[len("unix://"):])
    else:  # http://host:port[/path], e.g. a Daytona preview link
        from urllib.parse import urlsplit
        url = urlsplit(broker)
        probe = socket.create_connection((url.hostname, url.port or 80), timeout=2)
    probe.close()
    reached.append(f"connected to the other sandbox's broker {broker}")
except (OSError, ValueError):
    pass
try:
    os.kill(target["victim_pid"], 0)
    os.kill(target["victim_pid"], signal.SIGKILL)
    reached.append(f"signalled pid {target['victim_pid']}")
except OSError as exc:
    pass
verdict(canaries=sorted(found), where="another sandbox", reached=reached, **walk.report())
''')

WRITE_OUTSIDE = _snippet(r'''
written = []
for path in target["write_targets"]:
    try:
        with open(path, "w") as handle:
            handle.write("escaped")
        written.append(path)
    except OSError:
        pass
verdict(written=written)
''')

COUNT_PROCESSES = _snippet(r'''
walk = Walk()
pids = list(walk.pids())
names = sorted(read(f"/proc/{p}/comm").strip() for p in pids)
verdict(count=len(pids), names=names[:30], **walk.report())
''')

BROKER_TOKEN = _snippet(r'''
import hashlib
words, walk = set(), Walk()
for pid in walk.pids():
    for part in ("cmdline", "environ"):
        words.update(re.split(r"[\s\x00=\"',:]+", read(f"/proc/{pid}/{part}")))
for dirpath, name in walk.files(["/sandbox", "/run", "/tmp", os.getcwd(), os.path.expanduser("~")]):
    words.update(re.split(r"[\s\x00=\"',:]+", read(os.path.join(dirpath, name))))
digests = {hashlib.sha256(w.encode()).hexdigest() for w in words if len(w) >= 16}
verdict(found=target["host_token_sha256"] in digests, words=len(words), **walk.report())
''')

INHERITED_FDS = _snippet(r'''
import subprocess, sys
def fds(pid="self"):
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out
mine = fds()
child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.listdir('/proc/self/fd')))"],
                       capture_output=True, text=True).stdout.strip()
allowed = ("pipe:", "socket:", "anon_inode:", "/dev/null", "/dev/pts", os.getcwd())
foreign = {fd: path for fd, path in mine.items() if not path.startswith(allowed)}
verdict(foreign=foreign, mine=mine, child=child)
''')

SYMLINK_PLANT = _snippet(r'''
import shutil
inputs = os.path.join(__rlmq.runtime_dir, "inputs")  # where the host uploads large inputs
shutil.rmtree(inputs, ignore_errors=True)
os.symlink(target["plant_dir"], inputs)
verdict(planted=os.path.islink(inputs))
''')


def _plant_check(verdict: dict[str, Any], target: Target) -> str:
    written = os.listdir(target.plant_dir) if target.plant_dir and os.path.isdir(target.plant_dir) else []
    return f"the host wrote {written} through a planted symlink" if written else ""


def _fd_check(verdict: dict[str, Any], target: Target) -> str:
    if verdict.get("foreign"):
        return f"file descriptors of the host: {verdict['foreign']}"
    if verdict.get("child") not in ("['0', '1', '2', '3']",):  # stdin/out/err + listdir's own fd
        return f"a child process inherited: {verdict.get('child')}"
    return ""


def _write_check(verdict: dict[str, Any], target: Target) -> str:
    created = [path for path in target.write_targets if os.path.exists(path)]
    return f"created {created}" if created else ""


def _victim_check(verdict: dict[str, Any], target: Target) -> str:
    return _found_canary(verdict, target) or (f"reached {verdict['reached']}" if verdict.get("reached") else "")


ATTACKS = [
    Attack("walk_filesystem", "a file anywhere in view holds the canary", WALK, _whole_walk(_found_canary)),
    Attack("proc_environ", "another process's environment or command line holds the canary", PROC_ENVIRON,
           _whole_walk(_found_canary)),
    Attack("proc_cwd_and_root", "/proc/<pid>/cwd or /root leads to the worker's .env", PROC_LINKS,
           _whole_walk(_found_canary)),
    Attack("relative_dotenv", "../../.env reaches the worker's .env", RELATIVE, _found_canary),
    Attack("host_cwd_and_home", "the worker's cwd or home is readable", HOST_PATHS, _whole_walk(_found_canary)),
    Attack("redis", "the host's Redis answers PING (PONG, or NOAUTH behind its password)", REDIS, _flag("pong")),
    Attack("loopback_listener", "a host TCP port on loopback answers", LISTENER, _flag("banner")),
    Attack("loopback_scan", "any loopback port accepts a connection", PORT_SCAN, _flag("open_ports")),
    Attack("other_sandbox", "another sandbox's files or processes are reachable", VICTIM, _whole_walk(_victim_check)),
    Attack("write_outside", "a file appears outside the sandbox's directory", WRITE_OUTSIDE, _write_check),
    Attack("count_processes", "the host's processes are visible (more than its own few)", COUNT_PROCESSES,
           _whole_walk(lambda v, t: f"sees {v['count']} processes" if v.get("count", 0) > 6 else "")),
    Attack("broker_token", "the host's broker token is readable", BROKER_TOKEN, _whole_walk(_flag("found"))),
    Attack("inherited_fds", "a file descriptor of the host is open in the sandbox", INHERITED_FDS, _fd_check),
    Attack("symlink_plant", "a symlink in the sandbox's directory makes the host write outside it", SYMLINK_PLANT,
           _plant_check, then={"payload": "rlmq upload " * 10_000}),
]


def parse_verdict(output: str) -> dict[str, Any]:
    lines = [line for line in (output or "").splitlines() if line.startswith(VERDICT)]
    if not lines:
        raise AssertionError(f"the attack printed no verdict: {output!r}")
    return json.loads(lines[-1][len(VERDICT):])


def run_attacks(execute: Callable[[str, dict[str, Any]], Any], target: Target) -> list[dict[str, Any]]:
    """Run every attack through ``execute(code, variables)``; one outcome per attack."""
    outcomes = []
    for attack in ATTACKS:
        verdict = parse_verdict(str(execute(attack.code, {"target": target.for_sandbox()})))
        if attack.then is not None:
            try:
                execute("pass", attack.then)
            except Exception as exc:
                verdict["then"] = f"{type(exc).__name__}: {exc}"
        outcomes.append({"name": attack.name, "evidence": attack.check(verdict, target), "verdict": verdict})
    return outcomes


def run_local_suite(target: Target, **options: Any) -> list[dict[str, Any]]:
    """Start a victim sandbox and an attacker sandbox on this machine, run the suite, check the victim."""
    from broker_bridge import interpreter_factory
    from broker_bridge.backends.local import LocalSandbox

    factory = interpreter_factory("local", execution_timeout=120, **options)
    victim, attacker = factory(), factory()
    try:
        target.aim_at(victim)
        attacker.start()
        assert attacker._client is not None and isinstance(attacker._backend, LocalSandbox)  # started, local
        target.host_token_sha256 = hashlib.sha256(
            attacker._client._headers["X-Rlmq-Host-Token"].encode()).hexdigest()
        isolation = attacker._backend.isolation
        outcomes = run_attacks(attacker.execute, target)
        try:
            alive = victim.execute("print('alive')") == "alive"
        except Exception as exc:
            alive = False
            outcomes.append({"name": "victim_survived", "evidence": f"the victim sandbox died: {exc}", "verdict": {}})
        if alive:
            outcomes.append({"name": "victim_survived", "evidence": "", "verdict": {}})
        outcomes.append({"name": "isolation", "evidence": "", "verdict": {"mode": isolation}})
        return outcomes
    finally:
        attacker.shutdown()
        victim.shutdown()


if __name__ == "__main__":
    from dotenv import load_dotenv

    load_dotenv(".env")  # as the worker's settings do: the keys are then in this process's memory too
    spec = json.loads(sys.stdin.read())  # not argv: the host's command line is no place for the canary
    isolation = spec.pop("isolation", "namespaces")
    print(json.dumps(run_local_suite(Target(**spec), isolation=isolation), default=repr))
