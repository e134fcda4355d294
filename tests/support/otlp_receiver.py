"""An OTLP/HTTP trace receiver on a free loopback port: what a collector or Phoenix receives, kept as spans.

It decodes each ``POST /v1/traces`` (protobuf ``ExportTraceServiceRequest``, as the SDK's OTLP/HTTP
exporter sends it) with OpenTelemetry's own protobuf classes and keeps every span as a ``Span`` with its
ids in hex, its attributes and events as plain values, and the ``process.pid`` of the process that sent it.
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

__all__ = ["OTLPReceiver", "Span"]


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    events: list[str]
    pid: int
    service: str
    start_ns: int = 0
    end_ns: int = 0
    status: int = 0


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class OTLPReceiver:
    spans: list[Span] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                receiver._keep(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _keep(self, request: ExportTraceServiceRequest) -> None:
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        self.spans.append(Span(
                            name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(), attributes={a.key: _value(a.value) for a in s.attributes},
                            events=[e.name for e in s.events], pid=int(resource.get("process.pid") or 0),
                            service=str(resource.get("service.name") or ""), start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano, status=s.status.code))

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    """``python -m tests.support.otlp_receiver``: serve until killed, print the endpoint, then a span count
    per second on stderr (benchmarks run it as a process of its own, so its CPU is not theirs)."""
    import sys
    import time

    receiver = OTLPReceiver()
    print(receiver.endpoint, flush=True)
    while True:
        time.sleep(1)
        print(f"{len(receiver.spans)} spans", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
