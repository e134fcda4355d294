"""How rlmq creates Daytona sandboxes: the options, the SDK's create params (private, named and
labelled after the spec, no env, no secrets, a wall-clock TTL by default), and preview-link headers."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from broker_bridge.backends.base import SandboxSpec, SandboxStartError

if TYPE_CHECKING:
    from daytona import CreateSandboxBaseParams, CreateSandboxFromImageParams, CreateSandboxFromSnapshotParams

__all__ = [
    "DEFAULT_TTL_MINUTES",
    "PREVIEW_TOKEN_HEADER",
    "SANDBOX_LABEL",
    "DaytonaOptions",
    "DaytonaResources",
    "build_create_params",
    "check_no_secrets",
    "preview_headers",
    "provider_of",
    "sandbox_labels",
]

SANDBOX_LABEL = "rlmq.sandbox"
PREVIEW_TOKEN_HEADER = "X-Daytona-Preview-Token"  # Sandbox.get_preview_link docstring, SDK 0.226
SKIP_WARNING_HEADER = "X-Daytona-Skip-Preview-Warning"  # no HTML interstitial in front of the broker
# A sandbox is destroyed this long after its creation whatever happens to its worker: longer than
# rlmq's default run time limit (6 h) plus a boot; a caller with longer runs passes its own.
DEFAULT_TTL_MINUTES = 7 * 60
_SECRETISH = re.compile(r"(?i)(api[_-]?key|token|secret|passw(or)?d|credential)")


class DaytonaResources(TypedDict, total=False):
    """An image-built sandbox's size: ``daytona.Resources``' numeric fields (memory and disk in GiB)."""

    cpu: int
    memory: int
    disk: int
    gpu: int


@dataclass(frozen=True)
class DaytonaOptions:
    """How sandboxes are created. Intervals are minutes, as the Daytona API takes them."""

    api_key: str | None = field(default=None, repr=False)  # default: DAYTONA_API_KEY, read at boot
    api_url: str | None = None  # default: DAYTONA_API_URL, else https://app.daytona.io/api
    target: str | None = None  # region; default: DAYTONA_TARGET, else the organization's
    snapshot: str | None = None  # default: Daytona's default Python snapshot
    image: str | None = None  # build from an image instead (slow first time)
    resources: DaytonaResources | None = None  # image only
    auto_stop_interval: int = 15  # stop after this long without activity (0 = never)
    auto_delete_interval: int = 0  # delete this long after stopping: 0 = at once, negative = never
    ephemeral: bool | None = None  # SDK sugar for auto_delete_interval=0
    ttl_minutes: int = DEFAULT_TTL_MINUTES  # hard wall-clock cap (destroyed even if busy); 0 = off
    network_block_all: bool | None = None  # True needs Flask already in the snapshot
    boot_timeout: float = 180.0  # seconds for create + install + broker health, every SDK call included
    api_timeout: float = 60.0  # seconds any later SDK call may take (uploads: plus 1 s per MiB)
    broker_port: int = 8765
    run_grace: float = 30.0  # the daemon's own run timeout is the host's plus this (a backstop)

    def __post_init__(self) -> None:
        if self.snapshot and self.image:
            raise ValueError("give snapshot= or image=, not both")
        if self.resources and not self.image:
            raise ValueError("resources= needs image=: a snapshot fixes its own resources")
        if self.ephemeral and self.auto_delete_interval > 0:
            raise ValueError("ephemeral=True means auto_delete_interval=0")
        if self.ttl_minutes is None or self.ttl_minutes < 0:
            raise ValueError("ttl_minutes must be a number of minutes (0 = no TTL)")
        if self.boot_timeout <= 0 or self.api_timeout <= 0:
            raise ValueError("boot_timeout and api_timeout must be positive")


def sandbox_labels(spec: SandboxSpec) -> dict[str, str]:
    return {**{str(k): str(v) for k, v in spec.labels.items()}, SANDBOX_LABEL: spec.sandbox_id}


def provider_of(options: DaytonaOptions) -> dict[str, str]:
    """Where this sandbox lives (the API and region, never the key), as a reaper elsewhere needs it."""
    found = {"api_url": options.api_url or os.environ.get("DAYTONA_API_URL", ""),
             "target": options.target or os.environ.get("DAYTONA_TARGET", "")}
    return {k: v for k, v in found.items() if v}


def build_create_params(
    spec: SandboxSpec, options: DaytonaOptions
) -> CreateSandboxFromImageParams | CreateSandboxFromSnapshotParams:
    """The SDK's create params for ``spec``: private, named and labelled, no env, no secrets."""
    from daytona import CreateSandboxFromImageParams, CreateSandboxFromSnapshotParams, Resources

    common: dict[str, Any] = {
        "name": spec.sandbox_id,
        "language": "python",
        "labels": sandbox_labels(spec),
        "public": False,
        "env_vars": None,
        "secrets": None,
        "auto_stop_interval": options.auto_stop_interval,
        "auto_delete_interval": options.auto_delete_interval,
        "ephemeral": options.ephemeral,
        "ttl_minutes": options.ttl_minutes,
        "network_block_all": options.network_block_all,
        "target": options.target,
    }
    params: CreateSandboxFromImageParams | CreateSandboxFromSnapshotParams
    if options.image:
        params = CreateSandboxFromImageParams(
            image=options.image, resources=Resources(**options.resources) if options.resources else None,
            **common)
    else:
        params = CreateSandboxFromSnapshotParams(snapshot=options.snapshot, **common)
    check_no_secrets(params, spec, api_key=options.api_key or os.environ.get("DAYTONA_API_KEY"))
    return params


def check_no_secrets(params: CreateSandboxBaseParams, spec: SandboxSpec, api_key: str | None = None) -> None:
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
