"""The run's root LM, sharing the fleet's limit for its model with every other run.

``fleet_root_lm(settings)`` is a ``dspy.LM`` whose engine (DSPy 3.4's ``complete(Request) ->
Response`` contract) sends each request through ``workers.subcalls.limited_call``: the adaptive
fleet limiter of the model (learned from the provider's headers, in-flight cap, the shared
429 cooldown), ``call_lm`` (direct HTTP for OpenAI-compatible endpoints, LiteLLM otherwise) and
rlmq's retries. So 32 concurrent runs' root calls to one model are one fleet-wide stream, paced
together with the sub-calls to that model. ``dspy.cache`` still sits in front (the LM's
``cache=True``), so a replayed call never reaches the limiter. DSPy's own retries are off:
``limited_call`` retries and must see every attempt.
"""

from __future__ import annotations

import time
from typing import Any

import dspy
from dspy.lm15 import Message, Response, ServerError, TextPart, Usage, response_to_events

from rlmq.settings import Settings
from workers.context import redis_client
from workers.llm_call import LMReply, Messages
from workers.subcalls import SUBTASK_DEADLINE_SECONDS, fleet_limiter, limited_call

__all__ = ["LimitedEngine", "fleet_root_lm", "request_messages"]


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
        return Response(id=None, model=self.model, message=Message.assistant([TextPart(reply.text)]),
                        finish_reason="stop",
                        usage=Usage(input_tokens=reply.usage.get("prompt_tokens", 0),
                                    output_tokens=reply.usage.get("completion_tokens", 0),
                                    total_tokens=reply.usage.get("total_tokens", 0)))

    def stream(self, request: Any) -> Any:
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def fleet_root_lm(settings: Settings) -> dspy.LM:
    """The root ``dspy.LM`` of a run: ``dspy.cache`` first, then the fleet-limited engine."""
    return dspy.LM(settings.lm, engine=LimitedEngine(settings), num_retries=0)
