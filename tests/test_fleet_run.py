"""Whole RLM runs through the fleet: one ``rlm`` worker process, two ``llm`` worker processes, a real
Redis, local sandboxes, and the stub LLM over HTTP playing both the scripted root LM and the sub-LM.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pytest
import redis
from celery.result import AsyncResult

from rlmq.celery_config import LLM_QUEUE, LLM_TASK, RLM_QUEUE, RUN_TASK
from rlmq.client import Client, ClientError
from rlmq.demo import CORPUS
from rlmq.inputs import load_input_value, open_input_value
from rlmq.store.blobs import put_blobs
from rlmq.store.keys import dspy_cache_key, response_cache_key
from rlmq.store.records import RunSpec, RunStatus, RunStore, new_run_id
from tests.support.fleet import Fleet, fleet_fixture, redis_url_of
from tests.support.pickles import ExecOnUnpickle, hostile_pickles
from tests.support.records import stored_record, stored_result
from tests.support.stub_llm import FaultKind, ScriptedRoot, StubLLM, richest_in_chapter, route
from tests.support.wait import wait_until
from workers.claim import RunClaim
from workers.sandbox_registry import LeaseRegistry

if TYPE_CHECKING:
    from broker_bridge import SandboxInfo  # broker_bridge loads DSPy: imported where sandboxes run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_stub")]

PROVIDER_KEY = "sk-rlmq-test-provider-key"  # the workers' provider key: it may only reach the operator's stub

SIGNATURE = "chapters: list[str] -> richest: list[dict], verdict: str"
PROMPT = "Which character is richest in chapter {n}? Answer with one name.\n\n{text}"
STEPS = [
    "print(len(chapters), chapters[0][:30])",
    "prompts = [" + repr(PROMPT) + ".format(n=i + 1, text=c[:800]) for i, c in enumerate(chapters)]\n"
    "answers = llm_query_batched(prompts)\n"
    "import dspy\n"
    "verdict = dspy.Predict('question -> answer')(question='Who ends richest?').answer\n"
    "print(len(answers), answers[:2], verdict)",
    "SUBMIT(richest=[{'chapter': i + 1, 'answer': a} for i, a in enumerate(answers)], verdict=verdict)",
]


sub_answer = richest_in_chapter("Monte Cristo")


@pytest.fixture(scope="module")
def chapters() -> list[str]:
    value = load_input_value(f"@{CORPUS}", split="chapters")
    assert isinstance(value, list) and len(value) == 117
    return value


fleet = fleet_fixture(
    env={"RLMQ_LM": "openai/scripted-root", "RLMQ_SUB_LM": "openai/stub-sub",
         "RLMQ_RATE_LIMIT_RPS": "1000", "RLMQ_RATE_LIMIT_BURST": "1000", "RLMQ_LEASE_TTL": "30",
         "OPENAI_API_KEY": PROVIDER_KEY, "RLMQ_ALLOWED_TOOLS": "tests.support.sample_tools:*,no_such_package.tools:*"},
    workers=[("rlm", "rlm1", 2), ("llm", "llmA", 16), ("llm", "llmB", 16)])


def submit(r: redis.Redis, chapters: list[str], *, steps: list[str] = STEPS, options: dict | None = None,
           signature: str = SIGNATURE, stub: StubLLM, tools: Sequence[str] = ()) -> tuple[str, ScriptedRoot]:
    script = ScriptedRoot(steps)
    stub.set_responder(route(root=script, sub=sub_answer))
    run_id = new_run_id()
    spec = RunSpec(run_id=run_id, signature=signature, inputs=put_blobs(r, {"chapters": chapters}),
                   options={"max_iters": 6, "max_llm_calls": 300, **(options or {})}, tools=list(tools))
    Client(redis_url_of(r)).enqueue(spec)
    return run_id, script


def wait_finished(r: redis.Redis, run_id: str, timeout: float = 120.0) -> RunStatus:
    store = RunStore(r)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = store.status(run_id)
        if status is not None and status.finished:
            return status
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} still {store.status(run_id)} after {timeout}s")


def test_full_run_over_monte_cristo(fleet: Fleet, stub: StubLLM, r, chapters) -> None:
    run_id, script = submit(r, chapters, stub=stub)
    assert wait_finished(r, run_id) is RunStatus.SUCCEEDED, RunStore(r).get(run_id)
    result = stored_result(r, run_id)
    assert result["outputs"]["richest"] == [{"chapter": n, "answer": f"richest-{n}"} for n in range(1, 118)]
    assert result["outputs"]["verdict"] == "Monte Cristo"  # the sandbox sub-agent went through the fleet
    assert len(result["trajectory"]) == 3 and "117 Chapter" in result["trajectory"][0]["output"]
    progress = result["progress"]
    assert progress["llm_calls"] == 118 and progress["iteration"] == 3
    sandbox = progress["sandbox"]  # the record says which sandbox ran the code and what isolated it
    assert (sandbox["backend"], sandbox["isolation"]) == ("local", "namespaces") and sandbox["id"]
    served = set(progress["llm_workers"])
    assert len(served) == 2 and served == {w.name for w in fleet.workers if w.queue == "llm"}
    assert script.calls == [0, 1, 2]
    assert AsyncResult(run_id).get(timeout=10)["status"] == "SUCCEEDED"
    assert LeaseRegistry(r, 30).live() == []  # the sandbox was released

    # The same run again: every root and sub call comes from Redis, none reaches the LLM.
    stub.reset_stats()
    rerun_id, _ = submit(r, chapters, stub=stub)
    assert wait_finished(r, rerun_id) is RunStatus.SUCCEEDED
    assert stub.request_count == 0
    assert stored_result(r, rerun_id)["outputs"] == result["outputs"]
    assert stored_result(r, rerun_id)["progress"]["cache_hits"] == 118


def test_faults_in_a_run_end_as_errors_and_the_run_finishes(fleet: Fleet, stub: StubLLM, r, chapters) -> None:
    stub.add_fault(FaultKind.SERVER_ERROR, count=None, marker="chapter 3?")
    stub.add_fault(FaultKind.MALFORMED, count=None, marker="chapter 5?")
    stub.add_fault(FaultKind.EMPTY, count=None, marker="chapter 7?")
    stub.add_fault(FaultKind.TIMEOUT, count=None, marker="chapter 9?", hang_seconds=3)
    stub.add_fault(FaultKind.SERVER_ERROR, count=1, marker="chapter 11?")
    run_id, _ = submit(r, chapters, stub=stub, options={"lm_timeout": 1, "lm_retries": 1})
    assert wait_finished(r, run_id) is RunStatus.SUCCEEDED, RunStore(r).get(run_id)
    answers = {row["chapter"]: row["answer"] for row in stored_result(r, run_id)["outputs"]["richest"]}
    for n in (3, 5, 7, 9):
        assert answers[n].startswith("[ERROR] "), (n, answers[n])
    assert answers[11] == "richest-11" and answers[1] == "richest-1"
    assert all(w.alive for w in fleet.workers)


def test_bad_input_is_a_failed_record_and_the_worker_lives(fleet: Fleet, stub: StubLLM, r, chapters) -> None:
    run_id, _ = submit(r, chapters[:3], stub=stub, signature="chapters: list[str] -> -> nonsense")
    assert wait_finished(r, run_id) is RunStatus.FAILED
    record = stored_record(r, run_id)
    assert record.error and record.error.startswith("ValueError:") and "->" in record.error, record.error
    # Celery stores FAILURE when the task returns, just after the run's record is written
    wait_until(lambda: AsyncResult(run_id).state == "FAILURE", 10, "Celery state FAILURE")
    crash_id, _ = submit(r, chapters[:3], stub=stub, steps=["import os\nos._exit(3)"], options={"max_iters": 2})
    assert wait_finished(r, crash_id) in (RunStatus.FAILED, RunStatus.SUCCEEDED)
    assert stored_record(r, crash_id).status.finished
    assert all(w.alive for w in fleet.workers)
    fleet.wait_ready(timeout=10)
    assert LeaseRegistry(r, 30).live() == []


def test_duplicate_delivery_does_not_run_twice(fleet: Fleet, stub: StubLLM, r, chapters) -> None:
    steps = ["import time\ntime.sleep(1.5)\nprint('slept')", "SUBMIT(richest=[], verdict='done')"]
    run_id, script = submit(r, chapters[:2], stub=stub, steps=steps)
    from tasks.run_rlm import run_rlm

    run_rlm.apply_async((run_id,), task_id=run_id)  # a redelivered copy of the same run
    assert wait_finished(r, run_id) is RunStatus.SUCCEEDED
    time.sleep(1.0)
    assert script.calls == [0, 1]  # one root LM conversation, not two


def test_progress_and_cancel(fleet: Fleet, stub: StubLLM, r, chapters) -> None:
    steps = ["print('warming up')", "import time\nfor _ in range(120):\n    time.sleep(0.5)\nprint('done')",
             "SUBMIT(richest=[], verdict='never')"]
    run_id, _ = submit(r, chapters[:5], stub=stub, steps=steps)
    result = AsyncResult(run_id)
    deadline = time.monotonic() + 60
    while not (result.state == "STARTED" and (result.info or {}).get("iteration") == 2):
        assert time.monotonic() < deadline, (result.state, result.info)
        time.sleep(0.1)
    info = result.info
    assert info["max_iters"] == 6 and info["elapsed"] > 0 and "llm_calls" in info and "cache_hits" in info
    assert stored_record(r, run_id).status is RunStatus.RUNNING
    assert len(LeaseRegistry(r, 30).live()) == 1
    t0 = time.monotonic()
    Client(redis_url_of(r)).cancel(run_id)
    assert wait_finished(r, run_id, timeout=20) is RunStatus.CANCELLED
    assert time.monotonic() - t0 < 8
    assert LeaseRegistry(r, 30).live() == []
    assert all(w.alive for w in fleet.workers)


def test_runs_send_progress_events_and_sub_calls_never_show_prompts(fleet: Fleet, stub: StubLLM, r, chapters) -> None:
    import threading

    from tasks.app import app

    events: list[dict] = []
    receivers: list = []

    def listen() -> None:
        # One capture for the whole test: events are Redis pub/sub, so a capture that ends and starts
        # again would miss what is published in between (a run's single task-received, say).
        with app.connection_for_read() as conn:
            receivers.append(app.events.Receiver(conn, handlers={"*": events.append}))
            receivers[0].capture(limit=None, timeout=None, wakeup=False)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    time.sleep(1.0)  # the receiver's queue must exist before events are sent
    run_id, _ = submit(r, chapters[:20], stub=stub)
    assert wait_finished(r, run_id) is RunStatus.SUCCEEDED
    time.sleep(1.0)
    receivers[0].should_stop = True
    thread.join(5)
    all_task_events = [e for e in events if e.get("type", "").startswith("task-")]
    task_events = [e for e in all_task_events if e["uuid"] == run_id]
    sub_received = [e for e in all_task_events if e["uuid"] != run_id and e["type"] == "task-received"]
    assert sub_received and all(e["name"] == "rlmq.llm_batch" for e in sub_received)
    for e in sub_received:  # Flower shows what a sub-task is, never the prompts it carries
        assert "prompt(s)" in e["args"] and run_id in e["kwargs"] and "richest" not in e["args"] + e["kwargs"]
    kinds = {e["type"] for e in task_events}
    assert {"task-received", "task-started", "task-succeeded"} <= kinds, kinds
    progress = [e for e in task_events if e["type"] == "task-started" and "iteration" in e]
    assert max(e["iteration"] for e in progress) == 3 and max(e["llm_calls"] for e in progress) == 21
    assert stored_result(r, run_id)["progress"]["llm_calls"] == 21


def test_a_chunked_input_reaches_the_sandbox_whole(fleet: Fleet, stub: StubLLM, r, chapters) -> None:
    """An input stored in chunks (here 64 KiB, by default 64 MiB) is one value again in the run."""
    client = Client(redis_url_of(r), blob_chunk_bytes=64 * 1024)
    script = ScriptedRoot(["SUBMIT(richest=[{'n': len(chapters), 'chars': sum(map(len, chapters))}], verdict='whole')"])
    stub.set_responder(route(root=script, sub=sub_answer))
    run_id = client.submit(SIGNATURE, {"chapters": chapters}, max_iters=3)
    assert r.keys("rlmq:blob-chunk:*"), "the corpus was not chunked"
    assert client.wait(run_id, timeout=120).status is RunStatus.SUCCEEDED
    assert client.result(run_id)["outputs"]["richest"] == [{"n": len(chapters), "chars": sum(map(len, chapters))}]


def test_a_streamed_corpus_is_parsed_once_and_a_steps_mutation_does_not_reach_the_next(
        fleet: Fleet, stub: StubLLM, r, tmp_path) -> None:
    """A ``.jsonl`` read while it is stored, in a whole run: the sandbox parses it once, and each step
    binds the input as given, whatever the step before did to its copy."""
    rows = [{"n": n, "text": f"row {n} " + "q" * 100} for n in range(2000)]  # past the inline limit: a file
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    script = ScriptedRoot([
        "documents[0]['text'] = 'mutated'\ndocuments.append({'n': -1})\nprint(len(documents))",
        "print(len(documents), documents[0]['text'][:5])",
        "SUBMIT(count=len(documents), first=documents[0]['text'][:5], parsed=__rlmq.inputs_parsed)",
    ])
    stub.set_responder(route(root=script, sub=sub_answer))
    client = Client(redis_url_of(r), blob_chunk_bytes=64 * 1024)
    run_id = client.submit("documents: list[dict] -> count: int, first: str, parsed: int",
                           {"documents": open_input_value(f"@{path}")}, max_iters=4)
    assert client.wait(run_id, timeout=120).status is RunStatus.SUCCEEDED
    assert client.result(run_id)["outputs"] == {"count": 2000, "first": "row 0", "parsed": 1}
    assert [step["output"].strip() for step in client.trace(run_id)[:2]] == ["2001", "2000 row 0"]


def test_cancel_before_start_and_the_worker_skips_it(fleet: Fleet, stub: StubLLM, r, chapters) -> None:
    from tasks.run_rlm import run_rlm

    script = ScriptedRoot(["SUBMIT(richest=[], verdict='ran')"])
    stub.set_responder(route(root=script, sub=sub_answer))
    spec = RunSpec(run_id=new_run_id(), signature=SIGNATURE, inputs=put_blobs(r, {"chapters": chapters[:2]}))
    RunStore(r).create(spec)
    Client(redis_url_of(r)).cancel(spec.run_id)
    assert RunStore(r).status(spec.run_id) is RunStatus.CANCELLED
    run_rlm.apply_async((spec.run_id,), task_id=spec.run_id)  # delivered anyway (revoke raced)
    time.sleep(2.0)
    assert RunStore(r).status(spec.run_id) is RunStatus.CANCELLED and script.calls == []


def test_beat_reaper_destroys_orphaned_sandbox_and_restarts_its_run(fleet: Fleet, r) -> None:
    from broker_bridge import SandboxDied, interpreter_factory
    from tasks.reap_leases import reap_leases

    created: list[SandboxInfo] = []
    interp = interpreter_factory("local", on_sandbox_created=created.append)()
    try:
        interp.start()
        spec = RunSpec(run_id=new_run_id(), signature=SIGNATURE, inputs={})
        RunStore(r).create(spec)
        # a worker claims it, then dies: it never renews its claim or its sandbox lease
        dead = RunClaim(r, spec.run_id, worker="dead-worker@nowhere", ttl_seconds=0.2)
        assert dead.take() == 1
        LeaseRegistry(r, 0.2).register(created[0], run_id=spec.run_id, owner=dead.owner)
        time.sleep(0.3)
        reap_leases.delay()
        deadline = time.monotonic() + 30
        while LeaseRegistry(r, 1).live() or not stored_record(r, spec.run_id).restarts:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        record = stored_record(r, spec.run_id)
        assert record.attempt == 2 and record.restart_reason is not None
        assert "dead-worker@nowhere stopped heartbeating" in record.restart_reason
        with pytest.raises(SandboxDied):
            interp.execute("print(1)")
        wait_finished(r, spec.run_id)  # attempt 2 ran (and failed: the spec has no inputs)
    finally:
        interp.shutdown()


TOOLS = ["tests.support.sample_tools:count_words", "tests.support.sample_tools:find_names",
         "tests.support.sample_tools:shout"]


def test_user_tools_run_on_the_worker_and_sandbox_code_calls_them(fleet: Fleet, stub: StubLLM, r, chapters) -> None:
    steps = ["words = count_words(text=chapters[0])\n"
             "found = find_names(chapters[0], limit=5)\n"  # keyword default names=None kept
             "loud = shout('dantes')\nprint(words, found, loud)",
             "SUBMIT(richest=[{'words': words, 'found': found}], verdict=loud)"]
    run_id, _ = submit(r, chapters[:1], stub=stub, steps=steps, tools=TOOLS)
    assert wait_finished(r, run_id) is RunStatus.SUCCEEDED, RunStore(r).get(run_id)
    outputs = stored_result(r, run_id)["outputs"]
    from tests.support.sample_tools import count_words, find_names

    assert outputs["richest"] == [{"words": count_words(chapters[0]), "found": find_names(chapters[0], limit=5)}]
    assert outputs["verdict"] == "DANTES!"
    first_root = next(rec for rec in stub.requests if rec.model == "scripted-root")
    for described in ("count_words", "find_names", "limit", "shout", "suffix"):
        assert described in first_root.prompt, f"{described} is not in the RLM's instructions"


def test_a_tool_that_does_not_import_fails_the_run_before_any_lm_call(fleet: Fleet, stub: StubLLM, r, chapters) -> None:
    stub.reset_stats()
    run_id, script = submit(r, chapters[:1], stub=stub, tools=["no_such_package.tools:helper"])
    assert wait_finished(r, run_id) is RunStatus.FAILED
    error = stored_record(r, run_id).error
    assert error is not None
    assert "no_such_package.tools:helper" in error and "cannot be imported" in error and "\n" not in error, error
    assert stub.request_count == 0 and script.calls == []
    run_id, _ = submit(r, chapters[:1], stub=stub, tools=["tests.support.sample_tools:no_such_function"])
    assert wait_finished(r, run_id) is RunStatus.FAILED
    error = stored_record(r, run_id).error
    assert error is not None and "has no function 'no_such_function'" in error
    assert stub.request_count == 0


def test_planted_pickles_in_every_cache_entry_are_misses_and_run_no_code(fleet: Fleet, stub: StubLLM, r, chapters,
                                                                         tmp_path) -> None:
    first_id, _ = submit(r, chapters[:6], stub=stub)
    assert wait_finished(r, first_id) is RunStatus.SUCCEEDED, RunStore(r).get(first_id)
    paid = stub.request_count
    first = stored_result(r, first_id)
    # Every cache entry the run left: its root-LM calls in dspy.cache, its sub-calls in the response cache.
    dspy_keys = sorted(r.scan_iter(match=dspy_cache_key("*")))
    response_keys = sorted(k for k in r.scan_iter(match=response_cache_key("*")) if k.count(b":") == 2)
    assert len(dspy_keys) == 3 and len(response_keys) == 7 and paid == 10
    marker = tmp_path / "pwned"
    pickles = hostile_pickles(marker)  # the dotted-name gadget first
    for i, key in enumerate(dspy_keys):
        r.set(key, b"P" + pickles[i % 2])  # "P": the tag rlmq once loaded with DSPy's restricted unpickler
    for i, key in enumerate(response_keys):
        r.set(key, pickles[i % 2])
    stub.reset_stats()
    rerun_id, _ = submit(r, chapters[:6], stub=stub)
    assert wait_finished(r, rerun_id) is RunStatus.SUCCEEDED, RunStore(r).get(rerun_id)
    assert not marker.exists()  # no pickle was loaded, in the rlm worker or an llm worker
    assert stub.request_count == paid  # every entry was a miss: the stub was paid again
    rerun = stored_result(r, rerun_id)
    assert rerun["outputs"] == first["outputs"] and rerun["progress"]["cache_hits"] == 0
    assert all(not r.get(k).startswith((b"P", b"\x80")) for k in dspy_keys + response_keys)  # rewritten as JSON


def test_a_submitter_cannot_point_a_run_at_its_own_endpoint(fleet: Fleet, stub: StubLLM, r, chapters,
                                                            monkeypatch) -> None:
    from tasks.app import app

    with StubLLM() as rogue:
        # The client refuses at submit when this machine is configured like the workers.
        for name, value in {"RLMQ_LM": "openai/scripted-root", "RLMQ_SUB_LM": "openai/stub-sub",
                            "RLMQ_LM_API_BASE": stub.api_base}.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(ClientError, match=r"lm_api_base=.* is not an endpoint the operator configured"):
            Client(redis_url_of(r)).submit(SIGNATURE, {"chapters": chapters[:2]}, lm_api_base=rogue.api_base)
        # A spec written straight to Redis: the run fails with the reason before any LM call.
        run_id, script = submit(r, chapters[:2], stub=stub, options={"lm_api_base": rogue.api_base})
        assert wait_finished(r, run_id) is RunStatus.FAILED
        error = stored_record(r, run_id).error
        assert error is not None and error.startswith("rlmq run options refused") and rogue.api_base in error, error
        assert script.calls == [] and stub.request_count == 0
        # Sub-calls enqueued by hand: the llm worker applies the same pins, and sampling parameters only.
        for options, params, why in (({"lm_api_base": rogue.api_base}, None, "not an endpoint the operator"),
                                     ({}, {"api_base": rogue.api_base}, "may not be set by a sub-call"),
                                     ({"lm": "openai/elsewhere"}, None, "is not allowed")):
            answers = app.send_task(LLM_TASK, args=(["hello?"], "openai/stub-sub", options, params)).get(timeout=30)
            assert why in (answers[0]["error"] or ""), answers
        assert rogue.http_requests == 0 and stub.request_count == 0  # no request, so no key, anywhere
    # The operator's endpoint does get the key, so the checks above could have seen one.
    ok_id, _ = submit(r, chapters[:2], stub=stub, steps=["SUBMIT(richest=[], verdict=llm_query('hi'))"])
    assert wait_finished(r, ok_id) is RunStatus.SUCCEEDED, RunStore(r).get(ok_id)
    assert stub.request_count == 2 and {rec.authorization for rec in stub.requests} == {f"Bearer {PROVIDER_KEY}"}


def test_a_user_tool_the_operator_did_not_list_fails_the_run_before_any_lm_call(fleet: Fleet, stub: StubLLM, r,
                                                                               chapters) -> None:
    script = ScriptedRoot(["SUBMIT(richest=[], verdict=system('id'))"])
    stub.set_responder(route(root=script, sub=sub_answer))
    spec = RunSpec(run_id=new_run_id(), signature=SIGNATURE, inputs=put_blobs(r, {"chapters": chapters[:2]}),
                   tools=["os:system"])  # host code sandbox code could call: the worker, handed over
    Client(redis_url_of(r)).enqueue(spec)
    assert wait_finished(r, spec.run_id) is RunStatus.FAILED
    error = stored_record(r, spec.run_id).error
    assert error is not None and "tools refused by the workers' settings: os:system" in error
    assert script.calls == [] and stub.request_count == 0


def test_a_pickled_task_message_is_refused_unread(fleet: Fleet, r, tmp_path) -> None:
    from celery import Celery

    marker = tmp_path / "pwned"
    sender = Celery("pickler", broker=redis_url_of(r), set_as_current=False)
    try:
        for queue, task in ((RLM_QUEUE, RUN_TASK), (LLM_QUEUE, LLM_TASK)):
            sender.send_task(task, args=(ExecOnUnpickle(marker),), serializer="pickle", queue=queue)
    finally:
        sender.close()
    refusal = "untrusted content of type pickle"
    deadline = time.monotonic() + 30
    while not (refusal in fleet.workers[0].log_tail(400) and any(refusal in w.log_tail(400) for w in fleet.workers[1:])):
        assert time.monotonic() < deadline, [w.log_tail(5) for w in fleet.workers]
        time.sleep(0.2)
    assert not marker.exists() and all(w.alive for w in fleet.workers)
