"""DSPy 3.4's engine contract (``complete(Request) -> Response``, ``dspy.lm15``) from rlmq's side:
a request as chat messages and sampling parameters, and an answer text as a response. Both of
rlmq's engines use it: the run's sub-LM (``workers.fanout.FleetEngine``) and its root LM
(``workers.root_lm.LimitedEngine``)."""

from __future__ import annotations

from typing import Any

from dspy.lm15 import Message, Response, TextPart, Usage

from workers.llm_call import Messages

__all__ = ["request_messages", "text_response"]


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
