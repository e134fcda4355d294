"""``interpreter_factory``: the zero-argument callable ``dspy.RLM(interpreter_factory=...)`` takes."""

from __future__ import annotations

import inspect
from typing import Any

from broker_bridge.backends.base import BackendName, Sandbox, SandboxInfo
from broker_bridge.interpreter import EXECUTION_INSTRUCTIONS, SandboxInterpreter

BACKENDS = tuple(name.value for name in BackendName)
_INTERPRETER_OPTIONS = frozenset(
    name for name in inspect.signature(SandboxInterpreter.__init__).parameters
    if name not in {"self", "backend_factory", "tools", "output_fields"}
)


def backend_name(backend: BackendName | str) -> BackendName:
    try:
        return BackendName(backend)
    except ValueError:
        raise ValueError(f"unknown sandbox backend {backend!r}; choose one of {', '.join(BACKENDS)}") from None


def backend_class(backend: BackendName | str) -> type[Sandbox]:
    if backend_name(backend) is BackendName.LOCAL:
        from broker_bridge.backends.local import LocalSandbox

        return LocalSandbox
    from broker_bridge.backends.daytona import DaytonaSandbox

    return DaytonaSandbox


class InterpreterFactory:
    """Creates one ``SandboxInterpreter`` (so one sandbox) per call; DSPy shuts each one down."""

    execution_instructions = EXECUTION_INSTRUCTIONS

    def __init__(self, backend: BackendName | str = BackendName.LOCAL, **options: Any) -> None:
        self.backend = backend_name(backend)
        self._backend_class = backend_class(backend)
        self._interpreter_options = {k: v for k, v in options.items() if k in _INTERPRETER_OPTIONS}
        self._backend_options = {k: v for k, v in options.items() if k not in _INTERPRETER_OPTIONS}
        accepted = set(inspect.signature(self._backend_class.__init__).parameters) - {"self"}
        unknown = sorted(set(self._backend_options) - accepted)
        if unknown:
            raise TypeError(
                f"unknown option(s) for the {self.backend.value} sandbox: {', '.join(unknown)} "
                f"(accepted: {', '.join(sorted(accepted | _INTERPRETER_OPTIONS))})"
            )

    def __call__(self) -> SandboxInterpreter:
        return SandboxInterpreter(
            lambda: self._backend_class(**self._backend_options), **self._interpreter_options
        )

    def __repr__(self) -> str:
        return f"InterpreterFactory(backend={self.backend.value!r})"


def interpreter_factory(backend: BackendName | str = BackendName.LOCAL, **options: Any) -> InterpreterFactory:
    """The factory for ``dspy.RLM(interpreter_factory=...)``.

    ``backend`` is ``"local"`` (subprocess sandbox) or ``"daytona"``. Options are the interpreter's
    (``execution_timeout``, ``labels``, ``on_sandbox_creating``, ``on_sandbox_created``, ``on_sandbox_destroyed``,
    ``tool_concurrency``, ``output_limit``, ...) and the backend's (e.g. ``memory_limit_mb`` for
    local, ``auto_stop_interval`` for Daytona); an unknown option is a ``TypeError`` now, not later.
    """
    return InterpreterFactory(backend, **options)


def destroy_sandbox(info: SandboxInfo) -> None:
    """For reapers: release a sandbox known only by its ``SandboxInfo`` (e.g. after its worker died).
    A Daytona sandbox is looked up where it lives (``info.provider``), with this process's key."""
    if info.backend == "local":
        from broker_bridge.backends.local import destroy_local_sandbox

        destroy_local_sandbox(info.sandbox_id)
    elif info.backend == "daytona":
        from broker_bridge.backends.daytona import delete_daytona_sandbox

        delete_daytona_sandbox(info.sandbox_id, api_url=info.provider.get("api_url"),
                               target=info.provider.get("target"))
    else:
        raise ValueError(f"unknown sandbox backend {info.backend!r}")


def reap_labelled(backend: str, labels: dict[str, str], provider: dict[str, str] | None = None) -> int:
    """For recovery: delete every sandbox of ``backend`` carrying ``labels`` (a run's, by its
    ``rlmq.run`` label), including any whose creation never reported back; how many were deleted.
    Local sandboxes die with the worker that started them, so there is nothing to find."""
    if backend == "local":
        return 0
    if backend == "daytona":
        from broker_bridge.backends.daytona import reap_daytona_sandboxes

        provider = provider or {}
        return reap_daytona_sandboxes(labels, api_url=provider.get("api_url"), target=provider.get("target"))
    raise ValueError(f"unknown sandbox backend {backend!r}")
