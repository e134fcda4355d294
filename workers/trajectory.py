"""A run's trajectory, kept as it happens: one JSON entry per RLM step, appended in Redis.

``TracedRLM`` is :class:`~workers.fanout.FleetRLM` with DSPy 3.4.1's per-iteration hooks wrapped
(``_execute_iteration``, ``_execute_code``, ``_extract_fallback``; ``tests/test_dspy_contract.py``
fails if their signatures change). Before each step it asks the run's budget; after it, it
appends the step to ``keys.run_trajectory_key(run_id)`` (RPUSH), so ``rlmq trace``, the run page
and the Python client see every finished step while the run still works.

An entry: ``step`` (1-based), ``kind`` (``code``, or ``extract`` when DSPy forced the answer at
``max_iters``), ``reasoning``, ``code``, ``output`` (cut to :data:`OUTPUT_KEEP` characters, head
and tail, the cut stated in the text and in ``output_cut``), ``output_chars``, ``final``, and
timings (``started_at`` unix seconds, ``seconds``, ``exec_seconds`` in the sandbox,
``lm_seconds`` the rest), with ``root`` and ``sub`` usage of that step (calls, cache hits,
errors, tokens, dollars paid and uncached, and ``seconds`` waiting for sub-calls).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from dspy.primitives.prediction import Prediction

from rlmq.keys import run_trajectory_key
from workers.fanout import FleetRLM

__all__ = ["OUTPUT_KEEP", "TracedRLM", "TrajectoryLog", "cut_output"]

logger = logging.getLogger(__name__)

OUTPUT_KEEP = 20_000  # characters of a step's output kept in the trace (DSPy shows the model 10,000)


def cut_output(text: str, keep: int = OUTPUT_KEEP) -> tuple[str, int]:
    """``text`` cut to ``keep`` characters (head and tail) with the cut stated; and how many were cut."""
    if len(text) <= keep:
        return text, 0
    head = keep // 2
    cut = len(text) - keep
    return f"{text[:head]}\n\n[... {cut:,} characters cut from the trace ...]\n\n{text[-(keep - head):]}", cut


class TrajectoryLog:
    """Appends a run's steps to Redis; monitoring must never break the run, so errors are logged."""

    def __init__(self, client: redis.Redis, run_id: str, usage: Any, *, ttl_seconds: int | None = None) -> None:
        self.redis = client
        self.key = run_trajectory_key(run_id)
        self.usage = usage  # workers.usage.RunUsage
        self.ttl_seconds = ttl_seconds  # renewed with every step, so a dead worker's trace still expires
        self.steps = 0
        self._began = 0.0
        self._began_wall = 0.0
        self._marks: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        self.exec_seconds = 0.0

    def begin(self) -> None:
        self._began, self._began_wall = time.monotonic(), time.time()
        self._marks = self.usage.group_marks()
        self.exec_seconds = 0.0

    def end(self, entry: Any, *, kind: str = "code", final: bool = False) -> dict[str, Any]:
        data = entry.model_dump() if hasattr(entry, "model_dump") else dict(entry or {})
        output = str(data.get("output", ""))
        kept, cut = cut_output(output)
        seconds = time.monotonic() - self._began
        self.usage.sync_root()
        self.steps += 1
        record = {
            "step": self.steps, "kind": kind, "final": final,
            "reasoning": str(data.get("reasoning", "")), "code": str(data.get("code", "")),
            "output": kept, "output_chars": len(output), "output_cut": cut,
            "started_at": round(self._began_wall, 3), "seconds": round(seconds, 3),
            "exec_seconds": round(self.exec_seconds, 3),
            "lm_seconds": round(max(0.0, seconds - self.exec_seconds), 3),
            "root": self.usage.root.minus(self._marks[0]), "sub": self.usage.sub.minus(self._marks[1]),
        }
        try:
            pipe = self.redis.pipeline()
            pipe.rpush(self.key, json.dumps(record, allow_nan=False, default=str))
            if self.ttl_seconds:
                pipe.expire(self.key, int(self.ttl_seconds))
            pipe.execute()
        except redis.RedisError:
            logger.exception("could not append step %d to %s", self.steps, self.key)
        return record

    def expire(self, seconds: int | None) -> None:
        if seconds:
            try:
                self.redis.expire(self.key, int(seconds))
            except redis.RedisError:
                logger.exception("could not set the expiry of %s", self.key)


class TracedRLM(FleetRLM):
    """``FleetRLM`` that checks the budget before each step and records each step as it ends."""

    def __init__(self, signature: Any, *, trace: TrajectoryLog, budget: Any,
                 on_code: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(signature, **kwargs)
        self.trace = trace
        self.budget = budget  # workers.budget.Budget
        self.on_code = on_code  # called when a step's code starts (the root call is then accounted)

    def _execute_iteration(self, repl: Any, variables: Any, history: Any, iteration: int,
                           *args: Any, **kwargs: Any) -> Any:
        self.budget.check_step()  # BudgetExceeded ends the run before the root LM is paid
        self.trace.begin()
        result = super()._execute_iteration(repl, variables, history, iteration, *args, **kwargs)
        if isinstance(result, Prediction):
            self.trace.end((result.trajectory or [{}])[-1], final=True)
        elif getattr(result, "entries", None):
            self.trace.end(result.entries[-1])
        return result

    def _execute_code(self, repl: Any, code: str, input_args: dict[str, Any]) -> Any:
        if self.on_code is not None:
            self.on_code()
        started = time.monotonic()
        try:
            return super()._execute_code(repl, code, input_args)
        finally:
            self.trace.exec_seconds += time.monotonic() - started

    def _extract_fallback(self, variables: Any, history: Any, output_field_names: list[str]) -> Prediction:
        self.budget.check_step()
        self.trace.begin()
        prediction = super()._extract_fallback(variables, history, output_field_names)
        outputs = {name: getattr(prediction, name, None) for name in output_field_names}
        self.trace.end({"reasoning": "max_iters reached: DSPy's extract step produced the outputs",
                        "code": "", "output": f"FINAL (extracted): {outputs}"}, kind="extract", final=True)
        return prediction
