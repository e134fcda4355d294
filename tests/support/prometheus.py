"""A real Prometheus server (Debian's ``prometheus``) scraping given targets every second, and its HTTP API.

``start_prometheus(spawn, tmp_path, targets)`` writes a config, starts the server on a free loopback port
as a child of ``spawn`` (a ``LocalStack.spawn``: stopped with the stack, its log kept) and waits until it
is ready; ``query(url, expr)`` is one instant query's samples as ``{frozenset(labels): value}``.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from rlmq.stack import ChildProcess
from tests.support.net import free_port, http_get
from tests.support.wait import wait_until

__all__ = ["PROMETHEUS", "query", "start_prometheus"]

PROMETHEUS = shutil.which("prometheus")


def start_prometheus(spawn: Callable[..., ChildProcess], tmp_path: Path, targets: list[str],
                     timeout: float = 60.0) -> tuple[str, ChildProcess]:
    assert PROMETHEUS, "Debian's prometheus is not installed"
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "rlmq", "static_configs": [{"targets": targets}]}],
    }))
    port = free_port()
    child = spawn("prometheus", [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"])
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert child.alive, f"prometheus exited:\n{child.log_tail()}"
        return http_get(url + "/-/ready")[0] == 200

    wait_until(ready, timeout, "Prometheus ready")
    return url, child


def query(url: str, expr: str) -> dict[frozenset[tuple[str, str]], float]:
    status, body = http_get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200, body
    data = json.loads(body)["data"]
    return {frozenset(s["metric"].items()): float(s["value"][1]) for s in data["result"]}
