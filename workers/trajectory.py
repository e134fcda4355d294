"""A run's trajectory, kept as it happens: one JSON entry per RLM step, appended in Redis.

``workers.rlm.TracedRLM`` calls ``TrajectoryLog.begin``/``end`` around each step; each finished step is
appended to ``keys.run_trajectory_key(run_id)`` (RPUSH), so ``rlmq trace``, the run page and the
Python client see every finished step while the run still works.

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
from typing import Any

import redis

from rlmq.store.keys import run_trajectory_key
from rlmq.store.records import Usage
from workers.usage import RunUsage

__all__ = ["OUTPUT_KEEP", "TrajectoryLog", "cut_output"]

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

    def __init__(self, client: redis.Redis, run_id: str, usage: RunUsage, *, ttl_seconds: int | None = None) -> None:
        self.redis = client
        self.key = run_trajectory_key(run_id)
        self.usage = usage
        self.ttl_seconds = ttl_seconds  # renewed with every step, so a dead worker's trace still expires
        self.steps = 0
        self._began = 0.0
        self._began_wall = 0.0
        self._before = Usage()  # the run's usage when the step began
        self.exec_seconds = 0.0

    def begin(self) -> None:
        self._began, self._began_wall = time.monotonic(), time.time()
        self._before = self.usage.usage()
        self.exec_seconds = 0.0

    def end(self, entry: Any, *, kind: str = "code", final: bool = False) -> dict[str, Any]:
        data = entry.model_dump() if hasattr(entry, "model_dump") else dict(entry or {})
        output = str(data.get("output", ""))
        kept, cut = cut_output(output)
        seconds = time.monotonic() - self._began
        now = self.usage.usage()
        self.steps += 1
        record = {
            "step": self.steps, "kind": kind, "final": final,
            "reasoning": str(data.get("reasoning", "")), "code": str(data.get("code", "")),
            "output": kept, "output_chars": len(output), "output_cut": cut,
            "started_at": round(self._began_wall, 3), "seconds": round(seconds, 3),
            "exec_seconds": round(self.exec_seconds, 3),
            "lm_seconds": round(max(0.0, seconds - self.exec_seconds), 3),
            "root": now.root.minus(self._before.root).to_json_dict(),
            "sub": now.sub.minus(self._before.sub).to_json_dict(),
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
