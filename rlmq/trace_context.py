"""The caller's OpenTelemetry trace, which a submitted run joins: read only if the caller loaded OpenTelemetry.

``Client.submit`` stores it in the run spec (``RunSpec.traceparent``, W3C Trace Context); the run's
spans (``workers.tracing``) then hang under the caller's span. rlmq never imports OpenTelemetry for
this: a program that has no tracing has nothing to join.
"""

from __future__ import annotations

import sys

__all__ = ["caller_traceparent"]


def caller_traceparent() -> str:
    """The active span as a W3C ``traceparent`` header value, or "" (no OpenTelemetry, no valid span)."""
    if "opentelemetry.trace" not in sys.modules:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent", "")
