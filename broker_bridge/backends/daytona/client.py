"""Daytona sandboxes, before any code runs in one: the SDK client (one per process), creation
parameters (private, named, labelled, no env, no secrets), preview-link headers, and the mapping of
the SDK's errors to rlmq's ``SandboxError`` kinds. ``daytona.py`` holds the backend itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from broker_bridge.backends.base import (
    SandboxCapacityError, SandboxDied, SandboxError, SandboxSpec, SandboxStartError,
)

__all__ = [
    "DaytonaOptions", "MISSING_KEY", "PREVIEW_TOKEN_HEADER", "SANDBOX_LABEL", "build_create_params",
    "check_no_secrets", "daytona_client", "describe_daytona_error", "preview_headers", "sandbox_labels",
]

SANDBOX_LABEL = "rlmq.sandbox"
PREVIEW_TOKEN_HEADER = "X-Daytona-Preview-Token"  # Sandbox.get_preview_link docstring, SDK 0.226
SKIP_WARNING_HEADER = "X-Daytona-Skip-Preview-Warning"  # no HTML interstitial in front of the broker
MISSING_KEY = ("DAYTONA_API_KEY is not set: export it (or pass api_key=) to run code in Daytona "
               "sandboxes, or use the local sandbox backend (--sandbox local)")
_SECRETISH = re.compile(r"(?i)(api[_-]?key|token|secret|passw(or)?d|credential)")
_TOTAL_QUOTA = re.compile(r"(?i)quota|limit exceeded|maximum allowed:|no available runners|"
                          r"insufficient (credits|balance|funds)")
_PER_SANDBOX_LIMIT = re.compile(r"(?i)exceeds maximum allowed per sandbox")
_NOT_RUNNING = re.compile(r"(?i)SANDBOX_NOT_RUNNING|not running|is stopped|context not found|"
                          r"context is not active|worker process ended|context shutdown")


# ---------------------------------------------------------------- client, one per process

_clients: dict[tuple[int, str, str | None, str | None], Any] = {}
_clients_lock = threading.Lock()


def _forget_clients_after_fork() -> None:
    global _clients_lock
    _clients.clear()  # the parent's clients hold its threads and sockets: useless here
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients_after_fork)


def daytona_client(api_key: str | None = None, api_url: str | None = None, target: str | None = None):
    """This process's ``daytona.Daytona`` for these credentials (created on first use)."""
    key = api_key or os.environ.get("DAYTONA_API_KEY", "").strip()
    if not key:
        raise SandboxStartError(MISSING_KEY)
    cache_key = (os.getpid(), hashlib.sha256(key.encode()).hexdigest(), api_url, target)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            from daytona import Daytona, DaytonaConfig, DaytonaError

            try:
                client = Daytona(DaytonaConfig(api_key=key, api_url=api_url, target=target))
            except DaytonaError as exc:
                raise describe_daytona_error(exc, during="connecting to Daytona") from exc
            _clients[cache_key] = client
    return client


# ---------------------------------------------------------------- pure helpers

@dataclass(frozen=True)
class DaytonaOptions:
    """How sandboxes are created. Intervals are minutes, as the Daytona API takes them."""

    api_key: str | None = field(default=None, repr=False)  # default: DAYTONA_API_KEY, read at boot
    api_url: str | None = None  # default: DAYTONA_API_URL, else https://app.daytona.io/api
    target: str | None = None  # region; default: DAYTONA_TARGET, else the organization's
    snapshot: str | None = None  # default: Daytona's default Python snapshot
    image: str | None = None  # build from an image instead (slow first time)
    resources: dict[str, int] | None = None  # {"cpu":, "memory": GiB, "disk": GiB}; image only
    auto_stop_interval: int = 15  # stop after this long without activity (0 = never)
    auto_delete_interval: int = 0  # delete this long after stopping: 0 = at once, negative = never
    ephemeral: bool | None = None  # SDK sugar for auto_delete_interval=0
    ttl_minutes: int | None = None  # hard wall-clock cap (destroyed even if busy); None = off
    network_block_all: bool | None = None  # True needs Flask already in the snapshot
    boot_timeout: float = 180.0  # seconds for create + install + broker health
    broker_port: int = 8765
    run_grace: float = 30.0  # the daemon's own run timeout is the host's plus this (a backstop)

    def __post_init__(self) -> None:
        if self.snapshot and self.image:
            raise ValueError("give snapshot= or image=, not both")
        if self.resources and not self.image:
            raise ValueError("resources= needs image=: a snapshot fixes its own resources")
        if self.ephemeral and self.auto_delete_interval > 0:
            raise ValueError("ephemeral=True means auto_delete_interval=0")


def sandbox_labels(spec: SandboxSpec) -> dict[str, str]:
    return {**{str(k): str(v) for k, v in spec.labels.items()}, SANDBOX_LABEL: spec.sandbox_id}


def build_create_params(spec: SandboxSpec, options: DaytonaOptions):
    """The SDK's create params for ``spec``: private, named and labelled, no env, no secrets."""
    from daytona import CreateSandboxFromImageParams, CreateSandboxFromSnapshotParams, Resources

    common: dict[str, Any] = dict(
        name=spec.sandbox_id,
        language="python",
        labels=sandbox_labels(spec),
        public=False,
        env_vars=None,
        secrets=None,
        auto_stop_interval=options.auto_stop_interval,
        auto_delete_interval=options.auto_delete_interval,
        ephemeral=options.ephemeral,
        ttl_minutes=options.ttl_minutes,
        network_block_all=options.network_block_all,
        target=options.target,
    )
    if options.image:
        params = CreateSandboxFromImageParams(
            image=options.image, resources=Resources(**options.resources) if options.resources else None,
            **common)
    else:
        params = CreateSandboxFromSnapshotParams(snapshot=options.snapshot, **common)
    check_no_secrets(params, spec, api_key=options.api_key or os.environ.get("DAYTONA_API_KEY"))
    return params


def check_no_secrets(params: Any, spec: SandboxSpec, api_key: str | None = None) -> None:
    """Refuse to create a sandbox that would carry a secret (explicit check, survives ``-O``)."""
    if params.env_vars or getattr(params, "secrets", None):
        raise SandboxStartError("refusing to pass environment variables or secrets into a Daytona sandbox")
    values = [params.name or "", *(params.labels or {}).values()]
    for key in params.labels or {}:
        if _SECRETISH.search(key):
            raise SandboxStartError(f"refusing to create a sandbox with the secret-looking label {key!r}")
    for secret in (api_key, spec.sandbox_token):
        if secret and any(secret in value for value in values):
            raise SandboxStartError("refusing to put a token or API key into a sandbox's name or labels")


def preview_headers(token: str | None) -> dict[str, str]:
    """Headers the host sends through a private sandbox's preview link."""
    headers = {SKIP_WARNING_HEADER: "true"}
    if token:
        headers[PREVIEW_TOKEN_HEADER] = token
    return headers


def _message(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:500]


def describe_daytona_error(
    exc: BaseException, *, during: str = "creating the sandbox", booting: bool | None = None
) -> SandboxError:
    """The ``SandboxError`` to raise for a Daytona SDK error met while doing ``during``.

    While booting (the default unless ``during`` says "running"/"uploading") anything that is not a
    rate limit or quota is a ``SandboxStartError``; afterwards a lost sandbox is ``SandboxDied``.
    """
    from daytona import (
        DaytonaAuthenticationError, DaytonaConflictError, DaytonaConnectionError, DaytonaError,
        DaytonaForbiddenError, DaytonaNotFoundError, DaytonaRateLimitError, DaytonaTimeoutError,
    )
    from daytona.common.errors import (
        DaytonaBadGatewayError, DaytonaQueueTimeoutError, DaytonaServiceUnavailableError,
    )

    if isinstance(exc, SandboxError):
        return exc
    msg = _message(exc)
    if booting is None:
        booting = not during.startswith(("running", "uploading"))
    status = getattr(exc, "status_code", None)
    if isinstance(exc, DaytonaRateLimitError) or status == 429:
        headers = {str(k).lower(): v for k, v in (getattr(exc, "headers", None) or {}).items()}
        after = f" (Retry-After: {headers['retry-after']}s)" if headers.get("retry-after") else ""
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
