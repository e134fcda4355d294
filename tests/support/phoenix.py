"""A real Arize Phoenix server (``phoenix serve``) on free loopback ports, and its spans through its REST API.

Phoenix is heavy for CI (measured on the 2-core box: ``pip install arize-phoenix`` ~4 min and 850 MB,
``phoenix serve`` ~47 s to answer), so rlmq's tests find it where a developer installed it
(``RLMQ_TEST_PHOENIX=/path/to/phoenix``, or ``phoenix`` on PATH) and skip otherwise; CI checks the
same trace against ``tests.support.otlp_receiver``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.net import free_port, http_get
from tests.support.otlp_receiver import Span
from tests.support.wait import wait_until

__all__ = ["PHOENIX", "phoenix_server", "phoenix_spans"]

PHOENIX = os.environ.get("RLMQ_TEST_PHOENIX") or shutil.which("phoenix")


@contextmanager
def phoenix_server(tmp_path: Path, timeout: float = 240.0) -> Iterator[str]:
    """Phoenix serving on a free port; yields its base URL (also its OTLP/HTTP endpoint)."""
    assert PHOENIX
    port, grpc = free_port(), free_port()
    env = {**os.environ, "PHOENIX_WORKING_DIR": str(tmp_path / "phoenix"), "PHOENIX_PORT": str(port),
           "PHOENIX_GRPC_PORT": str(grpc), "PHOENIX_HOST": "127.0.0.1"}
    log = open(tmp_path / "phoenix.log", "wb")  # noqa: SIM115 (closed below, after the process)
    process = subprocess.Popen([PHOENIX, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert process.poll() is None, (tmp_path / "phoenix.log").read_text()[-2000:]
            return http_get(url + "/healthz", timeout=2)[0] == 200

        wait_until(up, timeout, "Phoenix answering", interval=0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(10)
        log.close()


def phoenix_spans(url: str, trace_id: str) -> list[Span]:
    """The spans of one trace as Phoenix stores them (its REST API), as ``Span`` objects."""
    spans: list[Span] = []
    cursor = ""
    while True:
        status, body = http_get(f"{url}/v1/projects/default/spans?limit=1000{cursor}")
        assert status == 200, body
        page = json.loads(body)
        for s in page["data"]:
            if s["context"]["trace_id"] != trace_id:
                continue
            attributes = dict(s["attributes"])
            spans.append(Span(name=s["name"], trace_id=trace_id, span_id=s["context"]["span_id"],
                              parent_id=s.get("parent_id") or "", attributes=attributes,
                              events=[e["name"] for e in s.get("events") or []], pid=0, service="",
                              start_ns=_ns(s["start_time"]), end_ns=_ns(s["end_time"])))
        if not page.get("next_cursor"):
            return spans
        cursor = f"&cursor={page['next_cursor']}"


def _ns(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp() * 1e9)
