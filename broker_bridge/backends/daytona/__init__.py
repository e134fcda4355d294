"""Daytona sandboxes (SDK 0.226): ``client`` (the SDK client, bounded calls, error mapping),
``options`` (create params, labels, preview headers), ``sandbox`` (the backend), ``output_log``
(streamed output), ``reap`` (deleting one sandbox, or a run's orphans by label)."""

from broker_bridge.backends.daytona.client import daytona_client, describe_daytona_error
from broker_bridge.backends.daytona.options import (
    DEFAULT_TTL_MINUTES,
    PREVIEW_TOKEN_HEADER,
    SANDBOX_LABEL,
    DaytonaOptions,
    build_create_params,
    preview_headers,
)
from broker_bridge.backends.daytona.output_log import OutputLog
from broker_bridge.backends.daytona.reap import delete_daytona_sandbox, reap_daytona_sandboxes
from broker_bridge.backends.daytona.sandbox import DaytonaSandbox

__all__ = [
    "DEFAULT_TTL_MINUTES",
    "PREVIEW_TOKEN_HEADER",
    "SANDBOX_LABEL",
    "DaytonaOptions",
    "DaytonaSandbox",
    "OutputLog",
    "build_create_params",
    "daytona_client",
    "delete_daytona_sandbox",
    "describe_daytona_error",
    "preview_headers",
    "reap_daytona_sandboxes",
]
