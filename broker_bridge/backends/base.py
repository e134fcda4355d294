"""What a sandbox backend must do, and the errors it raises.

A backend owns one sandbox: it boots it, installs the in-sandbox runtime (the files of
``broker_bridge/sandbox/``), starts the Flask broker there, runs code in one persistent Python
context, writes files, and destroys it. Everything above this line (tool calls, variables,
SUBMIT, output capping) is shared: see ``broker_bridge.interpreter``.
"""

from __future__ import annotations

import abc
import json
import socket
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from dspy.primitives.code_interpreter import CodeInterpreterError

SANDBOX_SOURCE_DIR = Path(__file__).resolve().parent.parent / "sandbox"
# Files every sandbox gets; the local backend adds kernel.py (Daytona has its own code interpreter).
RUNTIME_FILES = ("protocol.py", "broker.py", "runtime.py")


class BackendName(str, Enum):
    """The sandbox backends (``rlmq.settings.SandboxBackend`` names the same; a test keeps them equal)."""

    LOCAL = "local"  # this machine: bubblewrap namespaces, or plain processes (broker_bridge.backends.local)
    DAYTONA = "daytona"  # a Daytona cloud VM (broker_bridge.backends.daytona)


class Isolation(str, Enum):
    """What stands between sandbox code and the host."""

    NAMESPACES = "namespaces"  # local, the default: bubblewrap, no network, only the bound paths
    PROCESS = "process"  # local, accepted explicitly: plain subprocesses, NO security boundary
    VM = "vm"  # Daytona


# What a local sandbox may be asked for (``rlmq.settings.LocalIsolation`` names the same; a test keeps them equal).
LOCAL_ISOLATIONS = (Isolation.NAMESPACES, Isolation.PROCESS)


class SandboxError(CodeInterpreterError):  # type: ignore[misc]  # dspy ships no types: its base class is Any
    """Terminal: the sandbox cannot be used (never started, died, timed out, or was refused).

    A ``CodeInterpreterError`` that is not a ``CodeExecutionError``, so DSPy aborts the run
    instead of feeding it back to the model.
    """


class SandboxStartError(SandboxError):
    """The sandbox could not be created or its broker did not come up."""


class SandboxCapacityError(SandboxStartError):
    """The provider refused for now (rate limit, quota): retrying later may succeed."""


class SandboxDied(SandboxError):
    """The sandbox process or VM went away while in use."""


class SandboxTimeout(SandboxError):
    """One execute ran past its wall-clock limit; the sandbox was destroyed."""


@dataclass(frozen=True)
class SandboxSpec:
    """What the interpreter asks a backend to create."""

    sandbox_id: str  # deterministic per interpreter: "rlmq-<hex>"; also the Daytona sandbox name
    host_token_sha256: str  # the broker checks the host's token against this; the token never enters
    sandbox_token: str  # authorizes tool calls from sandbox code; lives only in sandbox memory
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BrokerEndpoint:
    """Where the host reaches the in-sandbox broker, and the headers the way in needs."""

    # http(s)://host:port[/prefix] (Daytona's preview link, a loopback port), or unix:///abs/path for a
    # broker on a Unix socket (the namespaced local sandbox): see protocol.broker_connection.
    url: str  # as the host sees it
    inside_url: str  # as sandbox code sees it, e.g. http://127.0.0.1:8765 or unix:///run/rlmq/broker.sock
    headers: dict[str, str] = field(default_factory=dict)  # e.g. Daytona's preview token header


@dataclass(frozen=True)
class SandboxInfo:
    """What lifecycle hooks and reapers need to know about a live sandbox."""

    backend: BackendName  # given as the enum or its value
    sandbox_id: str
    labels: dict[str, str]
    host: str = field(default_factory=socket.gethostname)
    # What stands between sandbox code and the host: VM (Daytona), NAMESPACES (local, bubblewrap),
    # PROCESS (local fallback, no security boundary); None (or "") when unknown, e.g. rebuilt from a lease.
    isolation: Isolation | None = None
    # Where the provider is reached, for a reaper in another process (Daytona: api_url, target).
    # Never a secret: the reaper brings its own key.
    provider: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Backends and leases may pass plain strings; an unknown name is an error here, not in a reaper later.
        object.__setattr__(self, "backend", BackendName(self.backend))
        object.__setattr__(self, "isolation", Isolation(self.isolation) if self.isolation else None)


class Sandbox(abc.ABC):
    """One sandbox. Not thread-safe except ``destroy``, which may be called from any thread."""

    kind: BackendName

    def __init__(self) -> None:
        self.bytes_sent = 0  # everything sent host -> sandbox: files, code, tool results (for bench/)

    @property
    @abc.abstractmethod
    def runtime_dir(self) -> str:
        """Absolute path, inside the sandbox, of the runtime files and uploaded inputs."""

    @abc.abstractmethod
    def boot(self, spec: SandboxSpec) -> BrokerEndpoint:
        """Create the sandbox, install ``RUNTIME_FILES`` into ``runtime_dir``, start the broker
        (``broker_command``) and a persistent Python context. Raise ``SandboxStartError``
        (``SandboxCapacityError`` for rate limits and quotas) and leave nothing behind on failure."""

    @abc.abstractmethod
    def put_file(self, relative_path: str, data: bytes | bytearray) -> None:
        """Write ``data`` to ``runtime_dir/relative_path``."""

    @abc.abstractmethod
    def run_code(self, code: str, timeout: float) -> None:
        """Run ``code`` in the persistent context and return when it finished.

        The runtime reports the outcome through the broker, so this only has to say whether the
        context survived: raise ``SandboxDied`` when it did not, ``SandboxTimeout`` (after
        destroying the sandbox) when ``timeout`` seconds passed.
        """

    @abc.abstractmethod
    def destroy(self) -> None:
        """Release everything; idempotent; never raises for an already-gone sandbox."""

    @abc.abstractmethod
    def info(self) -> SandboxInfo:
        """Identity of this sandbox for leases and reapers."""

    def planned_info(self, spec: SandboxSpec) -> SandboxInfo:
        """What ``info()`` will say once ``spec`` is booted, known before anything is created: enough
        for a reaper to find and delete the sandbox even if ``boot`` never returns."""
        return SandboxInfo(backend=self.kind, sandbox_id=spec.sandbox_id, labels=dict(spec.labels))


def broker_command(
    python: str,
    runtime_dir: str,
    spec: SandboxSpec,
    *,
    port: int | None = None,
    bind: str = "127.0.0.1",
    unix_socket: str | None = None,
    parent_pid: int | None = None,
    limits: dict[str, int] | None = None,
) -> list[str]:
    """The command that starts the in-sandbox broker. Only hashes of the tokens go on it.

    With ``port=0`` the broker picks a free port and prints ``RLMQ-BROKER-PORT <n>`` on stdout; with
    ``unix_socket`` it listens there instead (no network needed) and prints ``RLMQ-BROKER-SOCKET <path>``.
    With ``parent_pid`` it exits when that process is gone (local backend: a dead worker leaks nothing).
    """
    from broker_bridge.sandbox.protocol import token_digest

    if (port is None) == (unix_socket is None):
        raise ValueError("broker_command needs exactly one of port= and unix_socket=")
    where = ["--unix-socket", unix_socket] if unix_socket else ["--port", str(port), "--bind", bind]
    command = [
        python,
        f"{runtime_dir}/broker.py",
        *where,
        "--host-token-sha256", spec.host_token_sha256,
        "--sandbox-token-sha256", token_digest(spec.sandbox_token),
    ]
    if parent_pid is not None:
        command += ["--parent-pid", str(parent_pid)]
    if limits:
        command += ["--limits", json.dumps(limits)]
    return command


def runtime_file_contents(names: tuple[str, ...] = RUNTIME_FILES) -> dict[str, bytes]:
    """The in-sandbox runtime files, read from this package."""
    return {name: (SANDBOX_SOURCE_DIR / name).read_bytes() for name in names}
