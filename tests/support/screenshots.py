"""Headless-Chromium screenshots and DOM dumps of rlmq's run page and Flower, with live runs.

As a library (the tests use it): ``screenshot(url, png)`` and ``dom(url)`` drive Debian's
``/usr/bin/chromium`` with a fresh profile each time. As a script it brings up everything
itself and writes PNGs of live runs:

    python -m tests.support.screenshots --out rlmq-output/screenshots

(a private Redis, the workers, Flower, ``rlmq ui``, the stub LLM playing a scripted run that
fans out 40 sub-calls and then thinks for 90 s), shoots while it works, cancels it, and prints
the PNG paths.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["CHROMIUM", "chromium_missing", "dom", "screenshot"]

CHROMIUM = os.environ.get("RLMQ_CHROMIUM", "/usr/bin/chromium")
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--hide-scrollbars", "--mute-audio"]


def chromium_missing() -> str | None:
    """Why the Chromium tests cannot run here, or None."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"{CHROMIUM} is missing (Debian: apt-get install chromium)"
    return None


def _run(url: str, extra: list[str], timeout: float) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="rlmq-chromium-")
    try:
        return subprocess.run([CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *extra, url],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(url: str, png: Path | str, *, size: str = "1280,1700", wait_ms: int = 3000,
               timeout: float = 90) -> Path:
    """A PNG of ``url`` after ``wait_ms`` of (virtual) time, so scripts and XHRs have run."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    done = _run(url, [f"--screenshot={png}", f"--window-size={size}", f"--virtual-time-budget={wait_ms}"], timeout)
    if not png.exists() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot of {url} (exit {done.returncode}): {done.stderr[-800:]}")
    return png


def dom(url: str, *, wait_ms: int = 3000, timeout: float = 90) -> str:
    """The page's DOM after scripts ran (``--dump-dom``)."""
    done = _run(url, ["--dump-dom", f"--virtual-time-budget={wait_ms}"], timeout)
    if done.returncode != 0 and not done.stdout:
        raise RuntimeError(f"chromium could not load {url} (exit {done.returncode}): {done.stderr[-800:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="rlmq-output/screenshots")
    args = parser.parse_args(argv)
    if chromium_missing():
        print(chromium_missing(), file=sys.stderr)
        return 2
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from werkzeug.serving import make_server

    from rlmq.client import Client
    from rlmq.stack import LocalStack, flower_command
    from rlmq.ui import create_app
    from tests.support.net import free_port
    from tests.support.stub_llm import ScriptedRoot, StubLLM, route
    from tests.support.wait import wait_until

    out = Path(args.out)
    steps = ["print(len(items), items[:2])",
             "answers = llm_query_batched([f'describe {x}' for x in items])\nprint(answers[:3])",
             "import time\nfor _ in range(900):\n    time.sleep(0.1)\nprint('thought hard')",
             "SUBMIT(answers=answers)"]
    with StubLLM(latency=0.05) as stub:
        stub.set_responder(route(root=ScriptedRoot(steps), sub=lambda p: "an answer about " + p[-20:]))
        env = {"RLMQ_LM": "openai/gpt-4o-mini", "RLMQ_LM_API_BASE": stub.api_base, "OPENAI_API_KEY": "stub",
               "FLOWER_UNAUTHENTICATED_API": "true", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        with LocalStack(flower_port=None, env=env, llm_concurrency=16) as stack:
            flower_port, ui_port = free_port(), free_port()
            stack.spawn("flower", flower_command(port=flower_port, address="127.0.0.1"))
            client = Client(stack.redis_url)
            server = make_server("127.0.0.1", ui_port, create_app(client), threaded=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            time.sleep(3)  # Flower subscribes to events before the runs start
            live_id = client.submit("items: list[str] -> answers: list[str]",
                                    {"items": [f"item {i}" for i in range(40)]}, max_iters=8)
            wait_until(lambda: len(client.trace(live_id)) >= 2, 120, "the run's second step")  # then it thinks for 90 s
            pngs = [screenshot(f"http://127.0.0.1:{flower_port}/task/{live_id}", out / "flower_task_live.png",
                               size="1280,1100"),
                    screenshot(f"http://127.0.0.1:{flower_port}/tasks", out / "flower_tasks.png", size="1800,800",
                               wait_ms=5000),
                    screenshot(f"http://127.0.0.1:{ui_port}/run/{live_id}", out / "run_page_live.png", wait_ms=500),
                    screenshot(f"http://127.0.0.1:{ui_port}/", out / "runs.png", size="1280,700", wait_ms=500)]
            client.cancel(live_id)
            server.shutdown()
    for png in pngs:
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
