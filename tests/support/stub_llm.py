"""A stub OpenAI-compatible LLM server on loopback, for tests and benchmarks.

It answers ``POST {api_base}/chat/completions`` (``api_base`` is ``http://127.0.0.1:PORT/v1``),
which is where both of DSPy 3.4's engines post for ``dspy.LM("openai/<name>", api_base=...)``:
the default native engine (``engine="auto"``, DSPy's vendored lm15 client) and LiteLLM
(``engine="litellm"``). So tests drive the real ``dspy.LM`` -> HTTP path against it.

Runtime knobs (thread-safe): ``latency``; ``responder(messages, body) -> str`` making the
completion text; a fault plan (``add_fault``): 500, 429 with ``Retry-After``, a hang longer
than the client's timeout, a malformed JSON body, or an empty completion, for the next N
requests or for requests whose prompt contains a marker. Every request is recorded.

Provider mode (``set_provider_limit(rps, headers=...)``): the stub acts as a provider that allows
``rps`` requests per second (a token bucket holding one second's worth), states its limit on every
reply in OpenAI's, Anthropic's or OpenRouter's header format (or none), and answers 429 with
``Retry-After`` beyond it; optionally a tokens-per-minute limit charged with each reply's usage.

``ScriptedRoot`` plays an RLM root LM from a list of code steps; ``route`` sends RLM action
prompts to it and plain prompts (``llm_query`` sub-calls) elsewhere.

Run as a script: ``python -m tests.support.stub_llm --port 0 --latency 0.2`` prints its
api_base and serves until SIGTERM/SIGINT. Streaming (``"stream": true``) is not supported.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from tests.support.provider_limit import ProviderLimit

__all__ = [
    "Fault", "FaultKind", "ProviderLimit", "RequestRecord", "ScriptedRoot", "StubLLM", "chat_adapter_reply",
    "default_responder", "is_rlm_action", "last_user_text", "message_text", "repl_steps_done", "route",
]

Messages = list[dict[str, Any]]
Responder = Callable[[Messages, dict[str, Any]], str]

RLM_ACTION_MARKER = "You have access to a Python REPL environment"


class FaultKind(str, Enum):
    SERVER_ERROR = "500"
    RATE_LIMIT = "429"
    TIMEOUT = "timeout"  # hang without replying, then drop the connection
    MALFORMED = "malformed"  # 200 with a body that is not JSON
    EMPTY = "empty"  # 200 with content ""


@dataclass
class Fault:
    kind: FaultKind
    remaining: int | None = 1  # requests still to affect; None = every matching request
    marker: str | None = None  # only prompts containing this text
    retry_after: float = 1.0  # seconds, for RATE_LIMIT
    hang_seconds: float = 30.0  # for TIMEOUT


@dataclass(frozen=True)
class RequestRecord:
    at: float  # time.monotonic() on arrival
    model: str
    prompt: str  # all message texts joined by blank lines
    status: int  # HTTP status served; 0 when the connection was dropped (timeout fault)
    fault: str | None = None
    authorization: str | None = None  # the Authorization header as sent (tests check where keys go)


def message_text(message: dict[str, Any]) -> str:
    """Text of one chat message, whether content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def last_user_text(messages: Messages) -> str:
    return next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")


def default_responder(messages: Messages, body: dict[str, Any]) -> str:
    """Deterministic echo-ish answer: a hash of the last user message and its first 40 chars."""
    text = last_user_text(messages)
    return f"answer:{hashlib.sha256(text.encode()).hexdigest()[:12]}:{text[:40]}"


def post_chat(api_base: str, prompt: str, *, model: str = "stub", timeout: float = 10) -> dict[str, Any]:
    """One chat completion as any HTTP client posts it (no DSPy, no LiteLLM): the reply's JSON.
    An error status raises ``urllib.error.HTTPError``."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]}).encode()
    request = urllib.request.Request(f"{api_base}/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)  # the usual ~4 chars per token


class StubLLM:
    """Threaded stub server; use as a context manager or call start()/stop()."""

    def __init__(self, *, latency: float = 0.0, responder: Responder | None = None, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self._lock = threading.Lock()
        self._latency = latency
        self._responder: Responder = responder or default_responder
        self._faults: list[Fault] = []
        self._limit: ProviderLimit | None = None
        self._in_flight = 0
        self._peak_in_flight = 0
        self._records: list[RequestRecord] = []
        self._http_requests = 0  # every request on any path, answered or not
        self._served: list[tuple[int, int]] = []  # (prompt, completion) tokens of each 200 completion
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._port = port
        self._host = host  # another address: a harness host's, started within host.entered()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> StubLLM:
        if self._server is not None:
            return self
        server = _Server((self._host, self._port), type("Handler", (_Handler,), {"stub": self}))
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # releases hanging (timeout-fault) handlers
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> StubLLM:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("StubLLM is not running")
        return int(self._server.server_address[1])

    @property
    def api_base(self) -> str:
        return f"http://{self._host}:{self.port}/v1"

    # -- knobs -------------------------------------------------------------------------------
    @property
    def latency(self) -> float:
        with self._lock:
            return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        with self._lock:
            self._latency = float(seconds)

    def set_responder(self, responder: Responder | None) -> None:
        with self._lock:
            self._responder = responder or default_responder

    def add_fault(
        self,
        kind: FaultKind | str,
        *,
        count: int | None = 1,
        marker: str | None = None,
        retry_after: float = 1.0,
        hang_seconds: float = 30.0,
    ) -> Fault:
        """Serve ``kind`` to the next ``count`` matching requests (None: all of them)."""
        fault = Fault(FaultKind(kind), count, marker, retry_after, hang_seconds)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._limit = None

    def set_provider_limit(self, rps: float | None, *, headers: str | None = "openai",
                           tpm: int | None = None) -> None:
        """Act as a provider allowing ``rps`` requests/s (None: no limit); see the module docstring."""
        with self._lock:
            self._limit = ProviderLimit(rps, headers=headers, tpm=tpm) if rps else None

    # -- observability -----------------------------------------------------------------------
    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._records)

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    @property
    def http_requests(self) -> int:
        """Every HTTP request received, on any path (``request_count`` counts completions only)."""
        with self._lock:
            return self._http_requests

    @property
    def tokens_served(self) -> tuple[int, int]:
        """(prompt, completion) tokens the stub reported in its completions' ``usage``."""
        with self._lock:
            return sum(p for p, _ in self._served), sum(c for _, c in self._served)

    @property
    def peak_in_flight(self) -> int:
        """Most chat requests the stub was serving at once since the last ``reset_stats``."""
        with self._lock:
            return self._peak_in_flight

    def _enter(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)

    def reset_stats(self) -> None:
        with self._lock:
            self._records.clear()
            self._http_requests = 0
            self._served.clear()
            self._peak_in_flight = self._in_flight

    def reset(self) -> None:
        """As new: no faults or provider limit, no latency, no records, the default responder."""
        self.clear_faults()
        self.reset_stats()
        self.latency = 0.0
        self.set_responder(None)

    # -- serving (called from handler threads) -----------------------------------------------
    def _count_http(self) -> None:
        with self._lock:
            self._http_requests += 1

    def _plan(self, model: str, prompt: str,
              authorization: str | None = None) -> tuple[RequestRecord, Fault | None, float, Responder]:
        """Pick the fault for a request (consuming one use of it) and record the request."""
        with self._lock:
            if self._limit is not None:
                wait = self._limit.admit(time.monotonic())
                if wait > 0:  # over the provider's limit: a 429 that says when to come back
                    record = RequestRecord(time.monotonic(), model, prompt, 429, "limit")
                    self._records.append(record)
                    return record, Fault(FaultKind.RATE_LIMIT, retry_after=wait), 0.0, self._responder
            chosen = None
            for fault in self._faults:
                if fault.marker is None or fault.marker in prompt:
                    chosen = fault
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    break
            status = {None: 200, FaultKind.SERVER_ERROR: 500, FaultKind.RATE_LIMIT: 429, FaultKind.TIMEOUT: 0}.get(
                chosen.kind if chosen else None, 200
            )
            record = RequestRecord(time.monotonic(), model, prompt, status, chosen.kind.value if chosen else None,
                                   authorization)
            self._records.append(record)
            return record, chosen, self._latency, self._responder

    def _limit_headers(self, used_tokens: int = 0) -> dict[str, str]:
        with self._lock:
            if self._limit is None:
                return {}
            self._limit.charge(used_tokens)
            return self._limit.reply_headers(time.monotonic())

    def _restatus(self, record: RequestRecord, status: int) -> None:
        """Correct a recorded status (a responder that raised is served as a 500)."""
        with self._lock:
            for i, seen in enumerate(self._records):
                if seen is record:
                    self._records[i] = replace(record, status=status)

    def _completion(self, model: str, messages: Messages, text: str) -> dict[str, Any]:
        prompt_tokens = sum(_tokens(message_text(m)) for m in messages)
        completion_tokens = _tokens(text) if text else 0
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        with self._lock:
            self._served.append((prompt_tokens, completion_tokens))
        return {
            "id": f"chatcmpl-stub-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {**usage, "total_tokens": prompt_tokens + completion_tokens},
        }


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # listen backlog: the default 5 drops bursts of connects
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    stub: StubLLM
    protocol_version = "HTTP/1.1"  # keep-alive, as real providers do

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read the stub's records instead

    def setup(self) -> None:
        super().setup()
        # Headers and body are separate writes; without NODELAY, Nagle + delayed ACK add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        body = {"error": {"message": message, "type": kind, "code": status}}
        self._send(status, json.dumps(body).encode(), headers)

    def do_GET(self) -> None:
        self.stub._count_http()
        if self.path.rstrip("/") in ("/health", "/v1/health"):
            self._send(200, b'{"status":"ok"}')
        elif self.path.rstrip("/") in ("/models", "/v1/models"):
            self._send(200, json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode())
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:
        self.stub._count_http()
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") not in ("/chat/completions", "/v1/chat/completions"):
            self._error(404, f"no route {self.path}", "not_found")
            return
        try:
            body = json.loads(raw)
            messages = body["messages"]
            model = str(body.get("model", ""))
        except (ValueError, KeyError, TypeError) as exc:
            self._error(400, f"bad request body: {exc}", "invalid_request_error")
            return
        prompt = "\n\n".join(message_text(m) for m in messages)
        self.stub._enter(1)
        try:
            self._answer(model, messages, body, prompt)
        finally:
            self.stub._enter(-1)

    def _answer(self, model: str, messages: Messages, body: dict[str, Any], prompt: str) -> None:
        record, fault, latency, responder = self.stub._plan(model, prompt, self.headers.get("Authorization"))
        if latency > 0:
            self.stub._stopping.wait(latency)
        kind = fault.kind if fault else None
        if kind is FaultKind.TIMEOUT:
            assert fault is not None
            self.stub._stopping.wait(fault.hang_seconds)
            self.close_connection = True
            return
        if kind is FaultKind.SERVER_ERROR:
            self._error(500, "stub: injected server error", "server_error")
        elif kind is FaultKind.RATE_LIMIT:
            assert fault is not None
            seconds = fault.retry_after
            headers = {"Retry-After": f"{seconds:g}"}
            if fault.marker is None and record.fault == "limit":  # the provider mode's own 429
                headers = {**self.stub._limit_headers(), "Retry-After": str(max(1, math.ceil(seconds))),
                           "retry-after-ms": str(max(1, math.ceil(seconds * 1000)))}
            self._error(429, "stub: rate limit", "rate_limit_error", headers)
        elif kind is FaultKind.MALFORMED:
            self._send(200, b'{"id": "chatcmpl-stub", "choices": [{"message": ')
            self.close_connection = True
        else:
            try:
                text = "" if kind is FaultKind.EMPTY else responder(messages, body)
            except Exception as exc:  # a broken responder is the test's bug: make it loud as a 500
                self.stub._restatus(record, 500)
                self._error(500, f"stub responder failed: {exc!r}", "server_error")
                return
            completion = self.stub._completion(model, messages, text)
            headers = self.stub._limit_headers(completion["usage"]["total_tokens"])
            self._send(200, json.dumps(completion).encode(), headers)


# -- a scripted RLM root LM -----------------------------------------------------------------

_ITERATION = re.compile(r"\[\[ ## iteration ## \]\]\s*\n\s*(\d+)\s*/\s*(\d+)")
_STEP_HEADER = re.compile(r"^=== Step (\d+) ===$", re.MULTILINE)


def is_rlm_action(messages: Messages) -> bool:
    """True for dspy.RLM's action prompt (ChatAdapter-formatted, REPL instructions in the system message)."""
    system = "\n".join(message_text(m) for m in messages if m.get("role") == "system")
    user = last_user_text(messages)
    return RLM_ACTION_MARKER in system and "[[ ## repl_history ## ]]" in user


def repl_steps_done(user_text: str) -> int:
    """How many REPL history entries the action prompt already shows.

    The ``iteration`` field ("k/max_iters", 1-indexed, rendered after the history) is the
    authority: it is the last field, so code output cannot fake it. Without it, count the
    consecutive ``=== Step n ===`` headers that REPLHistory.format() writes.
    """
    found = _ITERATION.findall(user_text)
    if found:
        return int(found[-1][0]) - 1
    section = user_text.split("[[ ## repl_history ## ]]", 1)[-1]
    numbers = {int(n) for n in _STEP_HEADER.findall(section)}
    count = 0
    while count + 1 in numbers:
        count += 1
    return count


def chat_adapter_reply(fields: dict[str, str]) -> str:
    """A reply in ChatAdapter's format: ``[[ ## name ## ]]`` sections, then the completed marker."""
    parts = [f"[[ ## {name} ## ]]\n{value}" for name, value in fields.items()]
    return "\n\n".join(parts) + "\n\n[[ ## completed ## ]]\n"


def richest_in_chapter(predict_answer: str) -> Callable[[str], str]:
    """A sub-LM for runs over the book's chapters: a "richest in chapter N" prompt gets ``richest-N``, and a
    ``dspy.Predict('question -> answer')`` call from sandbox code (ChatAdapter form) gets ``predict_answer``."""

    def answer(prompt: str) -> str:
        if "[[ ## question ## ]]" in prompt:
            return chat_adapter_reply({"answer": predict_answer})
        match = re.search(r"richest in chapter (\d+)", prompt)
        return f"richest-{match.group(1)}" if match else "unknown"

    return answer


class ScriptedRoot:
    """Answers RLM action prompts with step k of ``steps``, k = REPL entries already shown.

    Past the end of the script it answers code that prints a notice; when RLM then hits
    ``max_iters`` its extract call is not an action prompt (``route`` sends it to ``sub``).
    """

    def __init__(self, steps: list[str]) -> None:
        self.steps = list(steps)
        self._lock = threading.Lock()
        self.calls: list[int] = []  # the step index served, per call

    def __call__(self, messages: Messages, body: dict[str, Any]) -> str:
        if not is_rlm_action(messages):
            raise ValueError("ScriptedRoot got a prompt that is not an RLM action prompt")
        k = repl_steps_done(last_user_text(messages))
        with self._lock:
            self.calls.append(k)
        if k < len(self.steps):
            code = self.steps[k]
        else:
            code = f'print("ScriptedRoot: no step {k + 1}; the script has {len(self.steps)}")'
        return chat_adapter_reply({"reasoning": f"Scripted step {k + 1}.", "code": f"```python\n{code}\n```"})


def route(root: Responder, sub: Callable[[str], str]) -> Responder:
    """A responder: RLM action prompts go to ``root``, anything else to ``sub(last user text)``."""

    def respond(messages: Messages, body: dict[str, Any]) -> str:
        if is_rlm_action(messages):
            return root(messages, body)
        return sub(last_user_text(messages))

    return respond


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument("--demo", action="store_true", help="script the LLM of `rlmq demo monte-cristo`")
    parser.add_argument("--limit-rps", type=float, default=None, help="act as a provider allowing this many requests/s")
    parser.add_argument("--limit-headers", default="openai", choices=["openai", "anthropic", "openrouter", "none"])
    args = parser.parse_args(argv)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    responder = None
    if args.demo:
        from tests.support.demo_script import DEMO, demo_sub_answer

        responder = route(root=DEMO, sub=demo_sub_answer)
    with StubLLM(latency=args.latency, port=args.port, responder=responder) as stub:
        stub.set_provider_limit(args.limit_rps, headers=None if args.limit_headers == "none" else args.limit_headers)
        print(stub.api_base, flush=True)
        stopped.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
