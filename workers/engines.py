"""rlmq's two DSPy 3.4 engines (``complete(Request) -> Response``, ``dspy.lm15``), and the conversion
of DSPy's requests and responses they share.

- ``FleetLM`` is a run's ``sub_lm``: its engine sends each request through the run's
  :class:`~workers.fanout.Fanout` (an ``llm_batch`` sub-task on the fleet). DSPy's own response
  cache and retries are off: the sub-task has both.
- ``fleet_root_lm(settings)`` is a run's root LM: ``dspy.cache`` first (Redis-backed in workers,
  ``workers.dspy_cache``), then an engine that sends each request through
  ``workers.lm_gateway.limited_call``: the model's fleet-wide limiter (shared with every other run
  and with the sub-calls), the LM client and rlmq's retries. DSPy's own retries are off:
  ``limited_call`` retries and must see every attempt. DSPy's native engine does not expose a
  success reply's headers, which the limiter learns from, hence an engine of our own.
"""

from __future__ import annotations

import time
from typing import Any

import dspy
from dspy.lm15 import Message, Response, ServerError, TextPart, Usage, response_to_events

from rlmq.settings import Settings
from workers.context import redis_client
from workers.fanout import Fanout
from workers.llm_call import LMReply, Messages
from workers.lm_gateway import SUBTASK_DEADLINE_SECONDS, fleet_limiter, limited_call

__all__ = ["FleetEngine", "FleetLM", "LimitedEngine", "fleet_root_lm", "request_messages", "text_response"]



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
    """A DSPy 3.4 engine (``complete(Request) -> Response``) answering through :class:`Fanout`."""

    def __init__(self, fanout: Fanout) -> None:
        self.fanout = fanout

    def complete(self, request: Any) -> Response:
        messages, params = request_messages(request)
        answer = self.fanout.query([messages], params=params)[0]
        if not answer.ok:
            raise ServerError(answer.error or "no answer")  # DSPy maps it to LMServerError for the facade
        return text_response(self.fanout.model, answer.text or "", answer.usage)

    def stream(self, request: Any) -> Any:
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


class FleetLM(dspy.LM):
    """The run's sub-LM: model = the run's sub-LM string; calls go through the fleet.

    DSPy's own response cache and retries are off: the ``llm_batch`` sub-task has both.
    """

    def __init__(self, fanout: Fanout, **kwargs: Any) -> None:
        super().__init__(fanout.model, engine=FleetEngine(fanout), cache=False, num_retries=0, **kwargs)


class LimitedEngine:
    """Answers a ``dspy.LM``'s requests through the fleet limiter of ``settings.lm``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model = settings.lm

    def complete(self, request: Any) -> Response:
        messages, params = request_messages(request)
        limiter = fleet_limiter(redis_client(self.settings.redis_url or None), self.model, self.settings)
        value, _ = limited_call(self.model, messages, self.settings, limiter, params=params,
                                deadline=time.monotonic() + SUBTASK_DEADLINE_SECONDS)
        if "error" in value:
            raise ServerError(str(value["error"]))
        reply = LMReply.from_json_dict(value)
        return text_response(self.model, reply.text, reply.usage)

    def stream(self, request: Any) -> Any:
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def fleet_root_lm(settings: Settings) -> dspy.LM:
    """The root ``dspy.LM`` of a run: ``dspy.cache`` first, then the fleet-limited engine."""
    return dspy.LM(settings.lm, engine=LimitedEngine(settings), num_retries=0)
