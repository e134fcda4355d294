"""rlmq's DSPy 3.4 engine (``complete(Request) -> Response``, ``dspy.lm15``), the two ways it answers,
and the conversion of DSPy's requests and responses.

:class:`FleetEngine` turns a request into chat messages and sampling parameters, hands them to an
*answer* function, and turns its reply into a ``Response`` (a failure into ``ServerError``, which
DSPy maps to ``LMServerError``). Two answer functions, two LMs:

- ``FleetLM`` is a run's ``sub_lm``: :func:`through_fanout` sends each request through the run's
  :class:`~workers.fanout.Fanout` (an ``llm_batch`` sub-task on the fleet). DSPy's own response
  cache and retries are off: the sub-task has both.
- ``fleet_root_lm(settings)`` is a run's root LM: ``dspy.cache`` first (Redis-backed in workers,
  ``workers.dspy_cache``), then :func:`through_limiter`, which sends each request through
  ``workers.lm_gateway.limited_call``: the model's fleet-wide limiter (shared with every other run
  and with the sub-calls), the LM client and rlmq's retries. DSPy's own retries are off:
  ``limited_call`` retries and must see every attempt. DSPy's native engine does not expose a
  success reply's headers, which the limiter learns from, hence an engine of our own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import dspy
from dspy.lm15 import Message, Response, ServerError, TextPart, Usage, response_to_events

from rlmq.settings import Settings
from workers.context import redis_client
from workers.fanout import Fanout
from workers.llm_call import LMReply, Messages
from workers.lm_gateway import ROOT_CALL_DEADLINE_SECONDS, LMFailure, fleet_limiter, limited_call

__all__ = [
    "Answerer", "FleetEngine", "FleetLM", "fleet_root_lm", "request_messages", "text_response", "through_fanout",
    "through_limiter",
]

# How an engine answers: chat messages + sampling parameters -> the reply, or why there is none.
Answerer = Callable[[Messages, dict[str, Any]], LMReply | LMFailure]


def request_messages(request: Any) -> tuple[Messages, dict[str, Any]]:
    """A DSPy 3.4 ``Request`` as chat messages plus sampling parameters."""
    messages: Messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(
            getattr(p, "text", "") or "" for p in request.system)
        messages.append({"role": "system", "content": system})
    messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
    config = request.config
    params = {k: v for k, v in (("temperature", config.temperature), ("max_tokens", config.max_tokens),
                                ("top_p", config.top_p), ("seed", config.seed)) if v is not None}
    if config.stop:
        params["stop"] = list(config.stop)
    return messages, params


def text_response(model: str, text: str, usage: dict[str, Any]) -> Response:
    """A finished completion of ``text`` with its token usage (OpenAI's names)."""
    return Response(id=None, model=model, message=Message.assistant([TextPart(text)]), finish_reason="stop",
                    usage=Usage(input_tokens=int(usage.get("prompt_tokens", 0)),
                                output_tokens=int(usage.get("completion_tokens", 0)),
                                total_tokens=int(usage.get("total_tokens", 0))))


class FleetEngine:
    """A DSPy 3.4 engine (``complete(Request) -> Response``) whose requests ``answer`` answers."""

    def __init__(self, model: str, answer: Answerer) -> None:
        self.model = model
        self.answer = answer

    def complete(self, request: Any) -> Response:
        messages, params = request_messages(request)
        reply = self.answer(messages, params)
        if isinstance(reply, LMFailure):
            raise ServerError(reply.error)
        return text_response(self.model, reply.text, reply.usage)

    def stream(self, request: Any) -> Any:
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def through_fanout(fanout: Fanout) -> Answerer:
    """Each request as a one-prompt batch of the run's fan-out (an ``llm_batch`` sub-task)."""

    def answer(messages: Messages, params: dict[str, Any]) -> LMReply | LMFailure:
        got = fanout.query([messages], params=params)[0]
        if not got.ok:
            return LMFailure(got.error or "no answer")
        return LMReply(text=got.text or "", usage=got.usage, cost=got.cost, model=fanout.model)

    return answer


def through_limiter(settings: Settings) -> Answerer:
    """Each request through the fleet limiter of ``settings.lm``, its LM client and retries."""

    def answer(messages: Messages, params: dict[str, Any]) -> LMReply | LMFailure:
        limiter = fleet_limiter(redis_client(settings.redis_url or None), settings.lm, settings)
        reply, _ = limited_call(settings.lm, messages, settings, limiter, params=params,
                                deadline=time.monotonic() + ROOT_CALL_DEADLINE_SECONDS)
        return reply

    return answer


class FleetLM(dspy.LM):
    """The run's sub-LM: model = the run's sub-LM string; calls go through the fleet.

    DSPy's own response cache and retries are off: the ``llm_batch`` sub-task has both.
    """

    def __init__(self, fanout: Fanout, **kwargs: Any) -> None:
        super().__init__(fanout.model, engine=FleetEngine(fanout.model, through_fanout(fanout)), cache=False,
                         num_retries=0, **kwargs)


def fleet_root_lm(settings: Settings) -> dspy.LM:
    """The root ``dspy.LM`` of a run: ``dspy.cache`` first, then the fleet-limited engine."""
    return dspy.LM(settings.lm, engine=FleetEngine(settings.lm, through_limiter(settings)), num_retries=0)
