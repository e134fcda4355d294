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
from dspy.lm15 import Response, ServerError, response_to_events

from rlmq.settings import Settings
from workers.context import redis_client
from workers.engine_io import request_messages, text_response
from workers.llm_call import LMReply
from workers.subcalls import SUBTASK_DEADLINE_SECONDS, fleet_limiter, limited_call

__all__ = ["LimitedEngine", "fleet_root_lm"]


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
