"""The ``rlmq`` command end to end, as a user runs it: ``rlmq up`` in the background, submit, status,
result, cancel, list, the Monte Cristo demo; Ctrl-C on ``rlmq up`` leaves nothing running.

The LLM provider is the only stand-in: a stub OpenAI-compatible endpoint on loopback whose root
model is scripted and whose sub-model answers from the prompt.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import pytest
import redis

from rlmq.demo import CHARACTERS, CORPUS
from tests.support.cli import RLMQ, Result, cli_env, processes_with_cmdline, processes_with_env, rlmq
from tests.support.demo_script import DEMO, DEMO_PROMPT, demo_sub_answer, is_demo_prompt, scripted_wealth
from tests.support.net import free_port, http_status, one_try_redis
from tests.support.sandboxes import SandboxesOf
from tests.support.stub_llm import ScriptedRoot, last_user_text, route
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow

SIGNATURE = "chapters: list[str], task: str -> richest: list[dict]"

ANALYSIS = ScriptedRoot([
    "answers = llm_query_batched([f'richest in chapter {i + 1}? ' + c[:500] for i, c in enumerate(chapters[:12])])\n"
    "print(answers[:2])",
    "SUBMIT(richest=[{'chapter': i + 1, 'answer': a} for i, a in enumerate(answers)])",
])
LONG_RUN = ScriptedRoot(["import time\nfor _ in range(1200):\n    time.sleep(0.1)", "SUBMIT(richest=[])"])
def sub_answer(prompt: str) -> str:
    if DEMO_PROMPT.search(prompt):
        return demo_sub_answer(prompt)
    if match := re.search(r"richest in chapter (\d+)", prompt):
        return f"richest-{match.group(1)}"
    return "unknown"


def root(messages, body):
    if is_demo_prompt(messages):
        return DEMO(messages, body)
    return (LONG_RUN if "LONGRUN" in last_user_text(messages) else ANALYSIS)(messages, body)


@pytest.fixture
def llm_env(tmp_path, stub_llm):
    stub_llm.set_responder(route(root=root, sub=sub_answer))
    return cli_env(tmp_path, RLMQ_LM="openai/scripted-root", RLMQ_SUB_LM="openai/stub-sub",
                   RLMQ_LM_API_BASE=stub_llm.api_base, OPENAI_API_KEY="stub-key")


def pump(stream: IO[str] | None, sink: Callable[[str], object]) -> None:
    """Each line of a child's piped output to ``sink``, from a daemon thread."""
    assert stream is not None

    def run() -> None:
        for line in stream:
            sink(line)

    threading.Thread(target=run, daemon=True).start()


def start_up(env, cwd, *args: str, seen: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([*RLMQ, "up", *(args or ("--no-flower", "--no-exporter")), "--llm-concurrency", "8"],
                               env=env,
                               cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    pump(process.stdout, lines.put)
    seen = [] if seen is None else seen
    while True:
        try:
            line = lines.get(timeout=180)
        except queue.Empty:
            process.kill()
            raise AssertionError("rlmq up did not come up:\n" + "".join(seen)) from None
        seen.append(line)
        if line.startswith("Ctrl-C stops everything"):
            match = re.search(r"REDIS_URL=(\S+)", "".join(seen))
            assert match, seen
            assert ":****@" in match.group(1), line  # the password is not printed
            state = json.loads((Path(env["RLMQ_STATE_DIR"]) / "stack.json").read_text())
            password = urlparse(state["redis_url"]).password
            assert password and password not in "".join(seen)
            return process, state["redis_url"]
        if process.poll() is not None and lines.empty():
            raise AssertionError("rlmq up exited:\n" + "".join(seen))


def test_cli_end_to_end_with_rlmq_up(tmp_path, llm_env):
    up, redis_url = start_up(llm_env, tmp_path)
    with SandboxesOf(up.pid) as sandboxes:  # this stack's sandboxes, not the machine's
        try:
            # the private Redis wants the generated password, which only the 0600 state file holds
            state = Path(llm_env["RLMQ_STATE_DIR"]) / "stack.json"
            assert stat.S_IMODE(state.stat().st_mode) == 0o600 and stat.S_IMODE(state.parent.stat().st_mode) == 0o700
            bare = redis.Redis.from_url(redis_url)
            with pytest.raises(redis.AuthenticationError):
                one_try_redis(port=bare.connection_pool.connection_kwargs["port"]).ping()
            assert bare.ping()

            # submit --wait: a scripted analysis over the first chapters of the book
            done = rlmq("submit", "--signature", SIGNATURE, "--input", f"chapters=@{CORPUS}", "--split", "chapters",
                        "--input", "task=find the richest", "--wait", "--timeout", "240", env=llm_env, cwd=tmp_path,
                        timeout=300)
            assert done.code == 0, done.stderr
            run_id = done.stdout.split()[0]
            assert "succeeded" in done.stderr and "sub-LLM calls 12" in done.stderr

            status = rlmq("status", run_id, env=llm_env, cwd=tmp_path)
            assert status.code == 0 and "succeeded" in status.stdout and "iteration 2/" in status.stdout

            out = tmp_path / "result.json"
            saved = rlmq("result", run_id, "-o", str(out), env=llm_env, cwd=tmp_path)
            assert saved.code == 0
            richest = json.loads(out.read_text())["outputs"]["richest"]
            assert richest == [{"chapter": n, "answer": f"richest-{n}"} for n in range(1, 13)]

            # a long run, cancelled while its code runs: its sandbox is gone within seconds
            long = rlmq("submit", "--signature", SIGNATURE, "--input", f"chapters=@{CORPUS}", "--split", "chapters",
                        "--input", "task=LONGRUN", env=llm_env, cwd=tmp_path)
            assert long.code == 0, long.stderr
            long_id = long.stdout.strip()
            wait_until(lambda: sandboxes.sample(), 120, what="the long run's sandbox")
            long_sandbox = sandboxes.sample()
            cancelled = rlmq("cancel", long_id, env=llm_env, cwd=tmp_path)
            assert cancelled.code == 0 and cancelled.stdout.split() == [long_id, "cancelled"], cancelled
            wait_until(lambda: not long_sandbox & sandboxes.live(), 10, what="the cancelled run's sandbox to be gone")

            # `rlmq worker` with no REDIS_URL joins the stack, password and all
            extra = subprocess.Popen([*RLMQ, "worker", "llm", "--name", "extra", "-c", "2"], env=llm_env, cwd=tmp_path,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                extra_out: list[str] = []
                pump(extra.stdout, extra_out.append)
                wait_until(lambda: any(" ready." in line for line in extra_out) or extra.poll() is not None, 120,
                           what="`rlmq worker llm` to be ready")
                assert extra.poll() is None, "".join(extra_out)
            finally:
                os.killpg(extra.pid, signal.SIGTERM)
                extra.wait(30)

            listed = rlmq("list", env=llm_env, cwd=tmp_path)
            assert listed.code == 0
            assert [line.split()[0] for line in listed.stdout.splitlines()] == [long_id, run_id]
            assert "CANCELLED" in listed.stdout and "SUCCEEDED" in listed.stdout
        finally:
            sandboxes.sample()
            up.send_signal(signal.SIGINT)  # Ctrl-C
            code = up.wait(90)
    assert code == 0
    wait_until(lambda: not processes_with_env(f"REDIS_URL={redis_url}"), 15, what="every stack process to exit")
    assert long_sandbox <= sandboxes.seen and not sandboxes.live(), (sandboxes.seen, sandboxes.live())


def test_demo_brings_up_its_own_stack_and_plots(tmp_path, llm_env):
    demo = subprocess.Popen([*RLMQ, "demo", "monte-cristo", "--output-dir", str(tmp_path / "out")], env=llm_env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with SandboxesOf(demo.pid) as sandboxes:  # the demo's own stack's sandboxes, not the machine's
        stdout, stderr = demo.communicate(timeout=600)
    result = Result(demo.returncode, stdout, stderr)
    assert result.code == 0, result.stderr
    rows = json.loads((tmp_path / "out" / "monte_cristo_wealth.json").read_text())
    assert len(rows) == 117 * 5
    seed = {"Edmond Dantès", "Danglars", "Fernand Mondego (Morcerf)", "Gérard de Villefort", "Mercédès"}
    assert set(CHARACTERS) == seed and {r["character"] for r in rows} == seed
    assert {(r["chapter"], r["character"]) for r in rows} == {(c, n) for c in range(1, 118) for n in seed}
    assert all(set(r) == {"chapter", "character", "wealth", "event"} for r in rows)
    assert all(isinstance(r["event"], str) and r["event"].strip() for r in rows), "a row without an event"
    assert rows[:5] == [{"chapter": 1, "character": name, "wealth": w, "event": e}
                        for name, (w, e) in zip(CHARACTERS, scripted_wealth(1), strict=True)]
    assert {r["wealth"] for r in rows if r["chapter"] == 117} == {10, 2, 1}
    png = (tmp_path / "out" / "monte_cristo_wealth.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert sandboxes.seen and not sandboxes.live(), (sandboxes.seen, sandboxes.live())


def test_rlmq_up_protects_flower_with_a_generated_login(tmp_path, llm_env):
    port, other_port, metrics_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in llm_env.items() if k != "FLOWER_BASIC_AUTH"}
    seen: list[str] = []
    up, redis_url = start_up(env, tmp_path, "--flower-port", str(port), "--rlm-concurrency", "1",
                             "--exporter-port", str(metrics_port), seen=seen)
    flower = None
    try:
        (login,) = [line for line in seen if line.startswith("flower login: ")]
        match = re.fullmatch(r"flower login: (\S+) / (\S+)\n", login)
        assert match, login
        user, password = match.groups()
        assert user == "rlmq" and len(password) >= 20
        state = json.loads((Path(env["RLMQ_STATE_DIR"]) / "stack.json").read_text())
        assert state["flower"]["basic_auth"] == f"rlmq:{password}"
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: http_status(url) != 0, 60, what="flower to answer")
        assert http_status(url) == 401 and http_status(url, "rlmq:wrong") == 401
        assert http_status(url, f"rlmq:{password}") == 200
        assert not processes_with_cmdline(password), "the login is on a command line"
        # the stack's Prometheus exporter serves the fleet's metrics (no login: counts and names only)
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        assert state["metrics"] == metrics
        wait_until(lambda: http_status(metrics) == 200, 60, what="rlmq exporter to answer")
        # `rlmq flower` without FLOWER_BASIC_AUTH reuses the stack's login; never an open dashboard
        flower = subprocess.Popen([*RLMQ, "flower", "--port", str(other_port)], env=env, cwd=tmp_path,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        other = f"http://127.0.0.1:{other_port}/"
        wait_until(lambda: http_status(other) != 0 or flower.poll() is not None, 60, what="rlmq flower")
        assert http_status(other) == 401 and http_status(other, f"rlmq:{password}") == 200
    finally:
        if flower is not None:
            os.killpg(flower.pid, signal.SIGTERM)
            flower.wait(30)
        up.send_signal(signal.SIGINT)
        code = up.wait(90)
    assert code == 0
    assert "rlmq:" + password not in "".join(seen).replace(login, "")  # printed once, on its own line
    wait_until(lambda: not processes_with_env(f"REDIS_URL={redis_url}"), 15, what="every stack process to exit")
