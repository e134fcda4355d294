"""The Daytona SDK client (one per process and credentials), SDK calls with a bound, and the mapping
of the SDK's errors to rlmq's ``SandboxError`` kinds."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from broker_bridge.backends.base import SandboxCapacityError, SandboxDied, SandboxError, SandboxStartError

if TYPE_CHECKING:
    from daytona import Daytona

__all__ = [
    "MISSING_KEY", "call_within", "daytona_client", "describe_daytona_error", "error_message", "forget_clients",
    "is_celery_time_limit", "retry_after",
]

T = TypeVar("T")

MISSING_KEY = ("DAYTONA_API_KEY is not set: export it (or pass api_key=) to run code in Daytona "
               "sandboxes, or use the local sandbox backend (--sandbox local)")
_TOTAL_QUOTA = re.compile(r"(?i)quota|limit exceeded|maximum allowed:|no available runners|"
                          r"insufficient (credits|balance|funds)")
_PER_SANDBOX_LIMIT = re.compile(r"(?i)exceeds maximum allowed per sandbox")
_NOT_RUNNING = re.compile(r"(?i)SANDBOX_NOT_RUNNING|not running|is stopped|context not found|"
                          r"context is not active|worker process ended|context shutdown")


# ---------------------------------------------------------------- client, one per process

_clients: dict[tuple[int, str, str | None, str | None], Daytona] = {}
_clients_lock = threading.Lock()


def forget_clients() -> None:
    """Drop the cached clients (after a fork their threads and sockets are the parent's; tests)."""
    global _clients_lock
    _clients.clear()
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=forget_clients)


def daytona_client(api_key: str | None = None, api_url: str | None = None, target: str | None = None) -> Daytona:
    """This process's ``daytona.Daytona`` for these credentials (created on first use).

    ``api_url``/``target`` default to the SDK's own (``DAYTONA_API_URL``, ``DAYTONA_TARGET``); the key to
    ``DAYTONA_API_KEY``, which never leaves this process (not in a sandbox, a label or a lease).
    """
    key = api_key or os.environ.get("DAYTONA_API_KEY", "").strip()
    if not key:
        raise SandboxStartError(MISSING_KEY)
    cache_key = (os.getpid(), hashlib.sha256(key.encode()).hexdigest(), api_url or None, target or None)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            from daytona import Daytona, DaytonaConfig, DaytonaError

            try:
                client = Daytona(DaytonaConfig(api_key=key, api_url=api_url or None, target=target or None))
            except DaytonaError as exc:
                raise describe_daytona_error(exc, during="connecting to Daytona") from exc
            _clients[cache_key] = client
    return client


def call_within(seconds: float, what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)`` for an SDK method that takes no timeout: run on a helper thread and
    abandoned (left to finish on its own) after ``seconds`` with the SDK's ``DaytonaTimeoutError``.
    Every other SDK call gets its timeout passed in; this is the watchdog for the rest."""
    returned: list[T] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            returned.append(call(*args, **kwargs))
        except BaseException as exc:  # handed to the caller's thread
            raised.append(exc)

    worker = threading.Thread(target=run, name=f"rlmq-daytona-{what}", daemon=True)
    worker.start()
    worker.join(max(0.0, seconds))
    if worker.is_alive():
        from daytona import DaytonaTimeoutError

        raise DaytonaTimeoutError(f"Daytona did not answer {what} within {seconds:.0f}s")
    if raised:
        raise raised[0]
    return returned[0]


# ---------------------------------------------------------------- errors

def is_celery_time_limit(exc: BaseException) -> bool:
    # broker_bridge does not import Celery; its time limits must pass through untouched
    return any(cls.__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded") for cls in type(exc).__mro__)


def error_message(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:500]


def retry_after(exc: BaseException, attempt: int) -> float | None:
    """Seconds to wait before asking again, when ``exc`` is a passing refusal (a rate limit, a busy or
    unreachable gateway: nothing was created); None when asking again cannot help (a quota, a bad key,
    a bad request). The provider's ``Retry-After`` when it sent one, else 1, 2, 4 … up to 8 s."""
    from daytona import DaytonaRateLimitError
    from daytona.common.errors import DaytonaBadGatewayError, DaytonaQueueTimeoutError, DaytonaServiceUnavailableError

    status = getattr(exc, "status_code", None)
    passing = (DaytonaRateLimitError, DaytonaBadGatewayError, DaytonaQueueTimeoutError, DaytonaServiceUnavailableError)
    if not (isinstance(exc, passing) or status in (429, 502, 503)):
        return None
    try:
        return max(0.0, float(_retry_after_header(exc) or ""))
    except ValueError:
        return float(min(8, 2 ** attempt))


def _retry_after_header(exc: BaseException) -> str | None:
    """The ``Retry-After`` an SDK error carries, if any (header names in any case)."""
    headers = {str(k).lower(): v for k, v in (getattr(exc, "headers", None) or {}).items()}
    value = headers.get("retry-after")
    return str(value) if value else None


def describe_daytona_error(
    exc: BaseException, *, during: str = "creating the sandbox", booting: bool | None = None
) -> SandboxError:
    """The ``SandboxError`` to raise for a Daytona SDK error met while doing ``during``.

    While booting (the default unless ``during`` says "running"/"uploading") anything that is not a
    rate limit or quota is a ``SandboxStartError``; afterwards a lost sandbox is ``SandboxDied``.
    """
    from daytona import (
        DaytonaAuthenticationError,
        DaytonaConflictError,
        DaytonaConnectionError,
        DaytonaError,
        DaytonaForbiddenError,
        DaytonaNotFoundError,
        DaytonaRateLimitError,
        DaytonaTimeoutError,
    )
    from daytona.common.errors import (
        DaytonaBadGatewayError,
        DaytonaQueueTimeoutError,
        DaytonaServiceUnavailableError,
    )

    if isinstance(exc, SandboxError):
        return exc
    msg = error_message(exc)
    if booting is None:
        booting = not during.startswith(("running", "uploading"))
    status = getattr(exc, "status_code", None)
    if isinstance(exc, DaytonaRateLimitError) or status == 429:
        header = _retry_after_header(exc)
        after = f" (Retry-After: {header}s)" if header else ""
        return SandboxCapacityError(f"Daytona rate limit hit while {during}{after}; retry later ({msg})")
    if isinstance(exc, DaytonaAuthenticationError) or status == 401:
        return SandboxStartError(f"Daytona rejected the API key while {during}: check DAYTONA_API_KEY ({msg})")
    if _PER_SANDBOX_LIMIT.search(msg):
        return SandboxStartError(f"Daytona refused the requested resources (per-sandbox limit): {msg}")
    if (isinstance(exc, DaytonaForbiddenError) or status in (400, 403)) and _TOTAL_QUOTA.search(msg):
        return SandboxCapacityError(
            f"Daytona quota or capacity exhausted while {during}: {msg}. Stop or delete sandboxes, "
            "raise the organization's limits, or retry later")
    if isinstance(exc, DaytonaForbiddenError):
        return SandboxStartError(f"Daytona refused {during} (HTTP 403): {msg}")
    if isinstance(exc, (DaytonaQueueTimeoutError, DaytonaServiceUnavailableError, DaytonaBadGatewayError)):
        return SandboxCapacityError(f"Daytona has no capacity right now ({during}); retry later ({msg})")
    if booting:
        if isinstance(exc, DaytonaConflictError):
            return SandboxStartError(f"a Daytona sandbox with this name already exists ({msg}); "
                                     "a previous attempt may still be alive: reap it first")
        if isinstance(exc, DaytonaTimeoutError):
            return SandboxStartError(f"Daytona timed out while {during}: {msg}")
        return SandboxStartError(f"Daytona failed while {during}: {msg}")
    if isinstance(exc, DaytonaNotFoundError):
        return SandboxDied(f"the Daytona sandbox is gone ({during}): {msg}")
    if _NOT_RUNNING.search(msg) or getattr(exc, "code", None) == "SANDBOX_NOT_RUNNING":
        return SandboxDied(f"the Daytona sandbox or its Python context stopped ({during}): {msg}")
    if isinstance(exc, (DaytonaConnectionError, DaytonaError)):
        return SandboxDied(f"lost the Daytona sandbox while {during}: {msg}")
    return SandboxDied(f"{type(exc).__name__} while {during}: {msg}")
