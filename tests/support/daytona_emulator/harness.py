"""Tests' side of the Daytona emulator: start it as a subprocess, point the SDK at it, turn its knobs.

Fixtures: ``daytona_emulator`` (one emulator for the session), ``emulator`` (that one, with faults,
clock and request counts reset around each test and its leftover sandboxes deleted afterwards), and
``daytona_env`` (``DAYTONA_API_URL``/``DAYTONA_API_KEY`` pointing at it, rlmq's client cache empty).
Light on purpose: conftest loads it as a plugin, so nothing heavy (aiohttp, the SDK, broker_bridge) at import.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from daytona import Daytona

REPO = Path(__file__).resolve().parents[3]
API_KEY = "emulator-test-key"
START_TIMEOUT = 30.0


class EmulatorProcess:
    """A running ``python -m tests.support.daytona_emulator``."""

    def __init__(self, *args: str, api_key: str = API_KEY, env: dict[str, str] | None = None,
                 cwd: Path = REPO) -> None:
        self.api_key = api_key
        command = [sys.executable, "-m", "tests.support.daytona_emulator", "--port", "0", "--api-key", api_key,
                   "--exit-with-parent", *args]
        self.process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})})
        stdout, stderr = self.process.stdout, self.process.stderr
        assert stdout is not None and stderr is not None  # both piped
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        self._stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, args=(stderr,), daemon=True).start()
        try:
            first = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            first = ""
        if not first.startswith("http"):
            self.stop()
            raise RuntimeError(f"the Daytona emulator did not start: {first!r} {''.join(self._stderr)[-2000:]}")
        self.api_url = first.strip()
        self.base_url = self.api_url.rsplit("/api", 1)[0]

    def _drain_stderr(self, stderr: IO[str]) -> None:
        for line in stderr:
            self._stderr.append(line)
            del self._stderr[:-200]

    # ---------------------------------------------------------------- the SDK's view

    def env(self) -> dict[str, str]:
        return {"DAYTONA_API_URL": self.api_url, "DAYTONA_API_KEY": self.api_key}

    def client(self, **config: Any) -> Daytona:
        """An unmodified ``daytona.Daytona`` for this emulator (production mode: socket.io events)."""
        from daytona import Daytona, DaytonaConfig

        return Daytona(DaytonaConfig(api_key=config.pop("api_key", self.api_key), api_url=self.api_url, **config))

    # ---------------------------------------------------------------- admin

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base_url}/_emulator{path}", data=data, method=method,
                                         headers={"Authorization": f"Bearer {self.api_key}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def faults(self, **spec: Any) -> dict[str, Any]:
        return self.admin("POST", "/faults", spec)

    def clear_faults(self) -> None:
        self.admin("DELETE", "/faults")

    def clock(self, **settings: float) -> dict[str, Any]:
        return self.admin("POST", "/clock", settings)

    def sandboxes(self) -> list[dict[str, Any]]:
        return self.admin("GET", "/sandboxes")

    def kill(self, sandbox_id: str, what: str = "agent") -> int:
        return self.admin("POST", f"/sandboxes/{sandbox_id}/kill", {"what": what})["killed"]

    def requests(self) -> dict[str, int]:
        return self.admin("GET", "/requests")

    def reset_requests(self) -> None:
        self.admin("DELETE", "/requests")

    def delete_all(self) -> None:
        for sandbox in self.sandboxes():
            with contextlib.suppress(urllib.error.URLError):
                request = urllib.request.Request(f"{self.api_url}/sandbox/{sandbox['id']}", method="DELETE",
                                                 headers={"Authorization": f"Bearer {self.api_key}"})
                urllib.request.urlopen(request, timeout=30).close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)


@contextlib.contextmanager
def running_emulator(*args: str, **kwargs: Any) -> Iterator[EmulatorProcess]:
    emulator = EmulatorProcess(*args, **kwargs)
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def daytona_emulator() -> Iterator[EmulatorProcess]:
    with running_emulator() as emulator:
        yield emulator


@pytest.fixture
def emulator(daytona_emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    daytona_emulator.clear_faults()
    daytona_emulator.reset_requests()
    try:
        yield daytona_emulator
    finally:
        daytona_emulator.clear_faults()
        daytona_emulator.clock(minute=60.0, create_delay=0.0)
        daytona_emulator.delete_all()


@pytest.fixture
def daytona_env(emulator: EmulatorProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorProcess]:
    """The environment a worker would have, pointing at the emulator; rlmq's clients start afresh."""
    for name, value in emulator.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DAYTONA_TARGET", raising=False)
    from broker_bridge.backends.daytona import client as daytona_client_module

    daytona_client_module.forget_clients()
    yield emulator
    daytona_client_module.forget_clients()
