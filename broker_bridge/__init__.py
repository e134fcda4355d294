"""Everything between the host and a sandbox: a DSPy 3.4 ``CodeInterpreter`` over local and Daytona
sandboxes, with an in-sandbox Flask broker for tool calls. Knows sandboxes and DSPy, not Celery or Redis.
"""

from broker_bridge.backends.base import (
    BackendName,
    Isolation,
    SandboxCapacityError,
    SandboxDied,
    SandboxError,
    SandboxInfo,
    SandboxStartError,
    SandboxTimeout,
)
from broker_bridge.factory import InterpreterFactory, destroy_sandbox, interpreter_factory, reap_labelled
from broker_bridge.interpreter import SandboxInterpreter, StoredInput

__all__ = [
    "BackendName",
    "InterpreterFactory",
    "Isolation",
    "SandboxCapacityError",
    "SandboxDied",
    "SandboxError",
    "SandboxInfo",
    "SandboxInterpreter",
    "SandboxStartError",
    "SandboxTimeout",
    "StoredInput",
    "destroy_sandbox",
    "interpreter_factory",
    "reap_labelled",
]
