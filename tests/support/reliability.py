"""Shared pieces of the fault-injection tests (tests/test_reliability_*.py): short lease and
heartbeat settings for the workers, scripted runs, and waiting on a run's record."""

from __future__ import annotations

import collections
import os
import re
import signal
import weakref

import psutil
import redis

from rlmq.client import Client
from rlmq.store.blobs import put_blobs
from rlmq.store.records import RunRecord, RunSpec, RunStore, new_run_id
from tests.support.fleet import redis_url_of
from tests.support.stub_llm import Responder, ScriptedRoot, StubLLM, message_text, route
from tests.support.wait import wait_until

__all__ = ["FAST_FAULTS_ENV", "SIGNATURE", "WORKER_ENV", "batch_step", "child_pids", "kill", "prompt_repeats", "sub_answer",
           "sub_requests", "submit", "wait_status"]

# Faults noticed in seconds, not the production 30 s / 10 s: claim and sandbox leases of 3 s,
# maintenance every second, worker heartbeats that expire after 2 s.
FAST_FAULTS_ENV = {"RLMQ_LEASE_TTL": "3", "RLMQ_MAINTENANCE_INTERVAL": "1", "RLMQ_WORKER_HEARTBEAT_TTL": "2",
                   "RLMQ_RATE_LIMIT_RPS": "1000", "RLMQ_RATE_LIMIT_BURST": "1000"}
# The workers of the fault tests: the stub plays a scripted root LM and answers sub-calls (``submit``).
WORKER_ENV = {"RLMQ_LM": "openai/scripted-root", "RLMQ_SUB_LM": "openai/stub-sub", **FAST_FAULTS_ENV}
SIGNATURE = "items: list[str] -> answers: list[str]"


def sub_answer(prompt: str) -> str:
    match = re.search(r"question (\d+)", prompt)
    return f"answer-{match.group(1)}" if match else "unknown"


def batch_step(n: int, *, then: str = "") -> str:
    return (f"answers = llm_query_batched([f'question {{i}} about ' + items[0] for i in range({n})])\n"
            f"print(len(answers), answers[:2])\n{then}")


# per stub: the responder that plays its runs' scripts, and those scripts by tag
_SCRIPTS: weakref.WeakKeyDictionary[StubLLM, tuple[Responder, dict[str, ScriptedRoot]]] = weakref.WeakKeyDictionary()


def submit(r: redis.Redis, stub: StubLLM, steps: list[str], *, options: dict | None = None,
           signature: str = SIGNATURE, tag: str = "x", url: str | None = None) -> tuple[str, ScriptedRoot]:
    """A run whose root LM plays ``steps``. ``tag`` names the run's input (``item-<tag>``), which
    the RLM's prompts show: runs with different tags get their own script and cache keys. ``url``:
    the Redis URL the client sends it with, where ``r``'s own cannot say it (a ``sentinel://``)."""
    script = ScriptedRoot(steps)
    owner, scripts = _SCRIPTS.get(stub, (None, {}))
    if owner is not stub._responder:  # a fresh stub, or another responder since: a new registry
        scripts = {}
    scripts[tag] = script

    def root(messages, body):
        text = "\n".join(message_text(m) for m in messages)
        for name, played in scripts.items():
            if f"item-{name}" in text:
                return played(messages, body)
        raise ValueError("no script for this run")

    stub.set_responder(route(root=root, sub=sub_answer))
    _SCRIPTS[stub] = (stub._responder, scripts)
    spec = RunSpec(run_id=new_run_id(), signature=signature, inputs=put_blobs(r, {"items": [f"item-{tag}"]}),
                   options={"max_iters": 6, "max_llm_calls": 500, **(options or {})})
    Client(url or redis_url_of(r)).enqueue(spec)
    return spec.run_id, script


def wait_status(r: redis.Redis, run_id: str, timeout: float = 120.0) -> RunRecord:
    store = RunStore(r)

    def finished():
        try:
            record = store.get(run_id)
        except (redis.ConnectionError, redis.TimeoutError):  # Redis restarting, or its host gone (a failover)
            return None
        return record if record is not None and record.status.finished else None

    try:
        return wait_until(finished, timeout, f"run {run_id} finished")
    except AssertionError as exc:
        try:
            record: object = store.get(run_id)
        except redis.RedisError as error:  # say what happened, not only that Redis is away now
            record = f"unreadable ({error})"
        raise AssertionError(f"{exc}; record: {record}") from None


def prompt_repeats(stub: StubLLM) -> dict[str, int]:
    """Prompts the stub was sent more than once (a root step or a sub-call paid twice)."""
    counts = collections.Counter(req.prompt for req in stub.requests if req.status == 200)
    return {p[:80]: n for p, n in counts.items() if n > 1}


def sub_requests(stub: StubLLM) -> int:
    return sum(1 for req in stub.requests if "question " in req.prompt and "REPL" not in req.prompt)


def child_pids(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
