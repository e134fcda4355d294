"""The stub LLM through the real dspy.LM path (native lm15 engine and LiteLLM), faults, ScriptedRoot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.stub_llm import ScriptedRoot, StubLLM, default_responder, post_chat, repl_steps_done, route

REPO = Path(__file__).resolve().parents[1]


def _lm(stub: StubLLM, engine: str = "auto", **kwargs: Any) -> Any:
    import dspy

    options = {"cache": False, "num_retries": 0, **kwargs}
    return dspy.LM("openai/stub-model", api_base=stub.api_base, api_key="stub", engine=engine, **options)


@pytest.mark.parametrize("engine", ["auto", "litellm"])
def test_dspy_lm_reaches_the_stub(stub_llm: StubLLM, engine: str) -> None:
    out = _lm(stub_llm, engine)(f"hello via {engine}")
    assert out == [default_responder([{"role": "user", "content": f"hello via {engine}"}], {})]
    (record,) = stub_llm.requests
    assert (record.model, record.prompt, record.status) == ("stub-model", f"hello via {engine}", 200)
    assert record.authorization == "Bearer stub"  # where keys go is what the trust tests check
    assert stub_llm.http_requests == 1


def test_reply_carries_usage(stub_llm: StubLLM) -> None:
    usage = post_chat(stub_llm.api_base, "x" * 40)["usage"]
    assert usage["prompt_tokens"] == 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 10


@pytest.mark.parametrize(
    ("engine", "kind", "error"),
    [
        ("auto", "500", "LMServerError"),
        ("auto", "429", "LMRateLimitError"),
        ("auto", "timeout", "LMTransportError"),  # lm15 calls its read timeout a transport error
        ("auto", "malformed", "LMProviderError"),
        ("litellm", "timeout", "LMTimeoutError"),
        ("litellm", "malformed", "LMServerError"),
    ],
)
def test_faults_surface_as_dspy_errors(stub_llm: StubLLM, engine: str, kind: str, error: str) -> None:
    import dspy

    stub_llm.add_fault(kind, retry_after=0.5, hang_seconds=10)
    started = time.monotonic()
    with pytest.raises(dspy.LMError) as caught:
        _lm(stub_llm, engine, timeout=1)(f"fault {kind}")
    assert type(caught.value).__name__ == error
    if kind == "429":
        assert caught.value.retry_after == 0.5  # read from the Retry-After header
    if kind == "timeout":
        assert 0.9 <= time.monotonic() - started < 5
    assert stub_llm.requests[-1].fault == kind
    assert _lm(stub_llm, engine)("after the fault") != []  # a fault is used up after one request


def test_empty_completion(stub_llm: StubLLM) -> None:
    stub_llm.add_fault("empty")
    assert _lm(stub_llm)("say nothing") == [""]


def test_dspy_retries_after_429_waiting_retry_after(stub_llm: StubLLM) -> None:
    stub_llm.add_fault("429", retry_after=0.6)
    assert _lm(stub_llm, num_retries=1)("retry me")[0].startswith("answer:")
    first, second = stub_llm.requests
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 0.55


def test_marker_faults_hit_only_matching_prompts(stub_llm: StubLLM) -> None:
    stub_llm.add_fault("500", count=None, marker="POISON")
    assert post_chat(stub_llm.api_base, "fine")["choices"]
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as caught:
            post_chat(stub_llm.api_base, "this is POISON")
        assert caught.value.code == 500
    assert [r.status for r in stub_llm.requests] == [200, 500, 500]
    stub_llm.clear_faults()
    assert post_chat(stub_llm.api_base, "POISON no more")["choices"]
    stub_llm.reset_stats()
    assert stub_llm.request_count == 0


def test_a_failing_responder_is_served_and_recorded_as_500(stub_llm: StubLLM) -> None:
    stub_llm.set_responder(lambda messages, body: str(1 / 0))
    with pytest.raises(urllib.error.HTTPError) as caught:
        post_chat(stub_llm.api_base, "divide")
    assert caught.value.code == 500 and b"ZeroDivisionError" in caught.value.read()
    assert [r.status for r in stub_llm.requests] == [500]


def test_hundred_concurrent_requests(stub_llm: StubLLM) -> None:
    stub_llm.latency = 0.5
    started = time.monotonic()
    with ThreadPoolExecutor(100) as pool:
        replies = list(pool.map(lambda i: post_chat(stub_llm.api_base, f"p{i}"), range(100)))
    elapsed = time.monotonic() - started
    assert len({r["choices"][0]["message"]["content"] for r in replies}) == 100
    assert stub_llm.request_count == 100
    assert elapsed < 5  # served in parallel: in series it would take 50 s


def test_repl_steps_done_counts_history_entries() -> None:
    from dspy.primitives.repl_types import REPLHistory

    history = REPLHistory().append(code="a = 1", output="").append(code="print(a)", output="1")
    text = f"[[ ## repl_history ## ]]\n{history.format()}"
    assert repl_steps_done(text) == 2
    assert repl_steps_done(text + "\n\n[[ ## iteration ## ]]\n3/10") == 2
    assert repl_steps_done("[[ ## repl_history ## ]]\nYou have not interacted with the REPL environment yet.") == 0


def test_scripted_root_drives_a_real_rlm(stub_llm: StubLLM) -> None:
    import dspy

    root = ScriptedRoot([
        "n = len(context)\nanswer_part = llm_query('how long is ' + str(n))\nprint(answer_part)",
        "SUBMIT(answer=answer_part)",
    ])
    stub_llm.set_responder(route(root=root, sub=lambda prompt: f"sub says: {prompt}"))
    rlm = dspy.RLM("context -> answer", max_iters=4, interpreter_factory=dspy.LocalInterpreter)
    with dspy.context(lm=_lm(stub_llm)):
        result = rlm(context="twelve chars")
    assert result.answer == "sub says: how long is 12"
    assert root.calls == [0, 1]
    assert [(r.prompt == "how long is 12") for r in stub_llm.requests] == [False, True, False]


def test_runs_as_a_script_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.stub_llm", "--port", "0", "--latency", "0.05"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
    )
    try:
        api_base = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert api_base.startswith("http://127.0.0.1:") and api_base.endswith("/v1")
        with urllib.request.urlopen(api_base.removesuffix("/v1") + "/health", timeout=5) as response:
            assert response.status == 200
        assert post_chat(api_base, "from the script")["choices"][0]["message"]["content"].startswith("answer:")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
