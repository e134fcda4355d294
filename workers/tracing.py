"""OpenTelemetry traces of runs, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the ``rlmq[otel]`` extra).

A run is one trace whose id is its run id (a run id is 32 hex digits, a W3C trace id), so every
attempt of a resumed run lands in the same trace and anyone holding the run id can find it; a run
submitted inside a caller's trace (``Client.submit`` with an active span) joins that trace instead.

    rlmq.run (attempt n)            per attempt: run id, signature, attempt, status, usage, cost
      rlmq.iteration                one per RLM step
        rlmq.root_lm                the step's root-LM call (GenAI semantic conventions)
        rlmq.code                   the step's code in the sandbox
          rlmq.tool                 a call of a user tool (--tool)
          rlmq.batch                an llm_query_batched / llm_query fan-out
            rlmq.llm_batch          a sub-task, on the llm worker that ran it (context in the
              rlmq.prompt           Celery message's ``traceparent`` header); each prompt, cached or paid

Spans are exported by the SDK's batch processor over OTLP/HTTP (the standard ``OTEL_*`` variables
configure it). Nothing here imports OpenTelemetry unless the endpoint is set: without it every call
below is a no-op on a shared null object. OpenTelemetry's Celery instrumentation is not used: it
would make each ``run_rlm`` delivery a trace root of its own (a resumed attempt a new trace), and
the one header rlmq needs is easier to carry itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

__all__ = ["NULL_SPANS", "TRACEPARENT", "RunSpans", "describe_answer", "enabled", "flush", "note_throttled",
           "root_lm_callback", "run_spans", "subtask_span"]

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"  # the Celery message header (W3C Trace Context) a sub-task's context travels in

_provider_lock = threading.Lock()
_tracer: Any = None
_provider: Any = None  # rlmq's own, not the global one: a user's tool may set its own
_pid = 0
_next_trace_id: ContextVar[int | None] = ContextVar("rlmq_next_trace_id", default=None)


def enabled() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip())


def _get_tracer() -> Any:
    """This process's tracer, made on first use (after a prefork child is forked: the exporter's thread is ours)."""
    global _tracer, _provider, _pid
    if _tracer is not None and _pid == os.getpid():
        return _tracer
    with _provider_lock:
        if _tracer is not None and _pid == os.getpid():
            return _tracer
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        class RunIdGenerator(RandomIdGenerator):
            """A run's root span takes the run's id as trace id; everything else is random."""

            def generate_trace_id(self) -> int:
                chosen = _next_trace_id.get()
                return chosen if chosen else super().generate_trace_id()

        service = os.environ.get("OTEL_SERVICE_NAME") or "rlmq"
        provider = TracerProvider(resource=Resource.create({"service.name": service, "process.pid": os.getpid()}),
                                  id_generator=RunIdGenerator())
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _tracer, _provider, _pid = provider.get_tracer("rlmq"), provider, os.getpid()
        return _tracer


def flush(timeout_ms: int = 5000) -> None:
    """Export what this process has ended so far (the end of a run, of a sub-task)."""
    if _provider is not None and _pid == os.getpid():
        with contextlib.suppress(Exception):
            _provider.force_flush(timeout_ms)


def _trace_id_of(run_id: str) -> int | None:
    try:
        value = int(run_id, 16) if len(run_id) == 32 else 0
    except ValueError:
        return None
    return value or None


class RunSpans:
    """One attempt's spans; every method is cheap and never raises (tracing must not break a run)."""

    def __init__(self, run_id: str, attempt: int, signature: str, parent: str | None = None) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace, self._context = trace, otel_context
        self._propagator = TraceContextTextMapPropagator()
        self.tracer = _get_tracer()
        parent_ctx = self._propagator.extract({TRACEPARENT: parent}) if parent else otel_context.Context()
        token = _next_trace_id.set(None if parent else _trace_id_of(run_id))
        try:
            self.run = self.tracer.start_span("rlmq.run", context=parent_ctx, attributes={
                "rlmq.run_id": run_id, "rlmq.attempt": attempt, "rlmq.signature": signature,
                "openinference.span.kind": "CHAIN"})
        finally:
            _next_trace_id.reset(token)
        if attempt > 1:
            self.run.add_event("rlmq.resumed", {"rlmq.attempt": attempt})
        self._code_ctx: Any = None  # the step's code span: tool calls arrive on other threads
        self._lm: dict[str, Any] = {}

    def _ctx(self, span: Any) -> Any:
        return self._trace.set_span_in_context(span)

    @contextlib.contextmanager
    def iteration(self, n: int) -> Iterator[None]:
        with self.tracer.start_as_current_span("rlmq.iteration", context=self._ctx(self.run),
                                               attributes={"rlmq.iteration": n, "openinference.span.kind": "CHAIN"}):
            yield

    @contextlib.contextmanager
    def code(self) -> Iterator[None]:
        with self.tracer.start_as_current_span("rlmq.code", attributes={"openinference.span.kind": "TOOL"}) as span:
            self._code_ctx = self._ctx(span)
            try:
                yield
            finally:
                self._code_ctx = None

    @contextlib.contextmanager
    def batch(self, prompts: int, model: str) -> Iterator[dict[str, str]]:
        """A fan-out's span; yields the headers its sub-tasks carry."""
        parent = self._code_ctx or self._context.get_current()
        with self.tracer.start_as_current_span("rlmq.batch", context=parent, attributes={
                "rlmq.prompts": prompts, "gen_ai.request.model": model, "openinference.span.kind": "CHAIN"}) as span:
            headers: dict[str, str] = {}
            self._propagator.inject(headers, context=self._ctx(span))
            yield headers

    def wrap_tool(self, tool: Callable[..., Any]) -> Callable[..., Any]:
        """A user tool whose every call is a span under the step's code (tool calls run on other threads)."""
        name = getattr(tool, "__name__", "tool")

        @functools.wraps(tool)
        def traced(*args: Any, **kwargs: Any) -> Any:
            parent = self._code_ctx or self._context.get_current()
            with self.tracer.start_as_current_span("rlmq.tool", context=parent, attributes={
                    "rlmq.tool": name, "openinference.span.kind": "TOOL", "tool.name": name}):
                return tool(*args, **kwargs)

        return traced

    def lm_start(self, call_id: str, model: str) -> None:
        current = self._trace.get_current_span().get_span_context().is_valid
        # under the step's span; DSPy's extract step (max_iters reached) runs outside any step: under the run
        span = self.tracer.start_span("rlmq.root_lm", context=None if current else self._ctx(self.run), attributes={
            "gen_ai.operation.name": "chat", "gen_ai.request.model": model, "openinference.span.kind": "LLM",
            "llm.model_name": model})
        self._lm[call_id] = span

    def lm_end(self, call_id: str, *, input_tokens: int, output_tokens: int, cached: bool, cost: float | None,
               error: BaseException | None = None) -> None:
        span = self._lm.pop(call_id, None)
        if span is None:
            return
        span.set_attributes({"gen_ai.usage.input_tokens": input_tokens, "gen_ai.usage.output_tokens": output_tokens,
                             "llm.token_count.prompt": input_tokens, "llm.token_count.completion": output_tokens,
                             "llm.token_count.total": input_tokens + output_tokens, "rlmq.cached": cached,
                             "rlmq.cost_usd": cost or 0.0})
        if error is not None:
            span.record_exception(error)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(error)[:200]))
        span.end()

    def event(self, name: str, **attributes: Any) -> None:
        """A budget stop, a cancel: an event on the run span."""
        self.run.add_event(name, attributes)

    def end(self, status: str, usage: Any = None, error: str | None = None) -> None:
        attributes: dict[str, Any] = {"rlmq.status": status}
        if usage is not None:
            total = usage.total
            attributes.update({
                "rlmq.usage.root_calls": usage.root.calls, "rlmq.usage.sub_calls": usage.sub.calls,
                "rlmq.usage.cache_hits": total.cache_hits, "gen_ai.usage.input_tokens": total.input_tokens,
                "gen_ai.usage.output_tokens": total.output_tokens, "rlmq.cost_paid_usd": total.cost_paid,
                "rlmq.cost_uncached_usd": total.cost_uncached})
        self.run.set_attributes(attributes)
        if error:  # a budget stop, a cancel, a failure: why, as an event too (trace views list events)
            self.run.add_event(f"rlmq.{status.lower()}", {"rlmq.reason": error[:500]})
            self.run.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error[:200]))
        elif status == "SUCCEEDED":
            self.run.set_status(self._trace.Status(self._trace.StatusCode.OK))
        self.run.end()
        flush()


class _NullSpans(RunSpans):
    """Tracing off: the same face, doing nothing (and importing nothing)."""

    def __init__(self) -> None:
        pass

    @contextlib.contextmanager
    def iteration(self, n: int) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def code(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def batch(self, prompts: int, model: str) -> Iterator[dict[str, str]]:
        yield {}

    def wrap_tool(self, tool: Callable[..., Any]) -> Callable[..., Any]:
        return tool

    def lm_start(self, call_id: str, model: str) -> None:
        pass

    def lm_end(self, call_id: str, *, input_tokens: int, output_tokens: int, cached: bool, cost: float | None,
               error: BaseException | None = None) -> None:
        pass

    def event(self, name: str, **attributes: Any) -> None:
        pass

    def end(self, status: str, usage: Any = None, error: str | None = None) -> None:
        pass


NULL_SPANS: RunSpans = _NullSpans()


def run_spans(run_id: str, attempt: int, signature: str, parent: str | None = None) -> RunSpans:
    """The attempt's spans, or the null object when tracing is off or cannot start."""
    if not enabled():
        return NULL_SPANS
    try:
        return RunSpans(run_id, attempt, signature, parent)
    except Exception:  # e.g. the extra is not installed: say so once per run, run untraced
        logger.warning("tracing is configured (OTEL_EXPORTER_OTLP_ENDPOINT) but could not start; "
                       "is rlmq[otel] installed?", exc_info=True)
        return NULL_SPANS


@contextlib.contextmanager
def subtask_span(traceparent: str | None, prompts: int, model: str, worker: str) -> Iterator[Any]:
    """An llm_batch sub-task's span on the llm worker, child of the batch span it came from; yields a
    ``prompt(cached=...)`` context-manager factory for each prompt's span (no-ops when off)."""
    if not traceparent or not enabled():
        yield _null_prompt
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    tracer = _get_tracer()
    parent = TraceContextTextMapPropagator().extract({TRACEPARENT: traceparent})
    with tracer.start_as_current_span("rlmq.llm_batch", context=parent, attributes={
            "rlmq.prompts": prompts, "rlmq.worker": worker, "gen_ai.request.model": model,
            "openinference.span.kind": "CHAIN", "process.pid": os.getpid()}):

        @contextlib.contextmanager
        def prompt(cached: bool) -> Iterator[Any]:
            with tracer.start_as_current_span("rlmq.prompt", attributes={
                    "gen_ai.operation.name": "chat", "gen_ai.request.model": model, "rlmq.cached": cached,
                    "openinference.span.kind": "LLM", "llm.model_name": model}) as span:
                yield span

        yield prompt
    flush()


def root_lm_callback(spans: RunSpans) -> Any:
    """A DSPy callback giving each root-LM call a span under the step's span (DSPy calls it in the run's thread)."""
    from dspy.utils.callback import BaseCallback

    from workers.pricing import price
    from workers.usage import root_call_tokens

    class RootLMSpans(BaseCallback):
        def __init__(self) -> None:
            self.lms: dict[str, Any] = {}

        def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            self.lms[call_id] = instance
            spans.lm_start(call_id, str(getattr(instance, "model", "")))

        def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
            lm = self.lms.pop(call_id, None)
            history = list(getattr(lm, "history", []) or [])
            tokens_in, tokens_out, cached = root_call_tokens(history[-1]) if history and exception is None \
                else (0, 0, False)
            spans.lm_end(call_id, input_tokens=tokens_in, output_tokens=tokens_out, cached=cached,
                         cost=price(str(getattr(lm, "model", "")), tokens_in, tokens_out), error=exception)

    return RootLMSpans()


def describe_answer(span: Any, answer: Any) -> None:
    """A prompt's outcome on its span: tokens (GenAI conventions), cache hit, attempts, cost, error."""
    tokens_in, tokens_out = int(answer.usage.get("prompt_tokens", 0)), int(answer.usage.get("completion_tokens", 0))
    span.set_attributes({"gen_ai.usage.input_tokens": tokens_in, "gen_ai.usage.output_tokens": tokens_out,
                         "llm.token_count.prompt": tokens_in, "llm.token_count.completion": tokens_out,
                         "rlmq.cached": bool(answer.cached), "rlmq.attempts": int(answer.attempts),
                         "rlmq.cost_usd": float(answer.cost or 0.0)})
    if answer.error:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, str(answer.error)[:200]))


def note_throttled(model: str) -> None:
    """A 429 as an event on the span under way (a prompt's, a root call's), when tracing runs."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event("rlmq.throttled", {"gen_ai.request.model": model})


@contextlib.contextmanager
def _null_prompt(cached: bool) -> Iterator[Any]:
    yield None
