"""A tree of runs survives its workers: SIGKILL of the worker holding a child (the child resumes by replay,
its parent receives one answer) or of the one holding the root (the root resumes and re-attaches to its
child instead of starting it again). Two rlm workers of one slot each, fast leases (``FAST_FAULTS_ENV``)."""

from __future__ import annotations

import pytest
import redis

from rlmq.client import Client
from rlmq.store.blobs import put_blobs
from rlmq.store.records import RunRecord, RunSpec, RunStatus, RunStore, new_run_id
from tests.support.fleet import Fleet, WorkerProcess, fleet_fixture, redis_url_of
from tests.support.records import stored_record, stored_result
from tests.support.reliability import WORKER_ENV, prompt_repeats, wait_status
from tests.support.rlm_tree import ScriptedTree, tree_responder
from tests.support.stub_llm import StubLLM
from tests.support.wait import wait_until
from workers.children import child_run_id
from workers.sandbox_registry import LeaseRegistry

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_stub")]

# The idle worker takes the child, even on a loaded machine: its parent waits 3 s before it helps.
fleet = fleet_fixture(env={**WORKER_ENV, "RLMQ_CHILD_HELP_AFTER": "3"},
                      workers=[("rlm", "rlmA", 1), ("rlm", "rlmB", 1), ("llm", "llmA", 8)], timeout=180)

ROOT = 'SUBMIT(answer=rlm_query("kid-0", {"n": 10}))'
KID = ('subs = llm_query_batched([f"{task} prompt {j}" for j in range(context["n"])])\n'
       'import time\ntime.sleep(4)\nSUBMIT(answer=task + ":" + str(sum(s.startswith("sub:") for s in subs)))')


def submit_root(r: redis.Redis, stub: StubLLM) -> tuple[str, ScriptedTree]:
    tree = ScriptedTree([ROOT], [("kid-", [KID])])
    stub.set_responder(tree_responder(tree))
    spec = RunSpec(run_id=new_run_id(), signature="question: str -> answer: str",
                   inputs=put_blobs(r, {"question": "a tree that loses a worker"}),
                   options={"max_iters": 3, "max_depth": 2})
    Client(redis_url_of(r)).enqueue(spec)
    return spec.run_id, tree


def child_on_the_other_worker(r: redis.Redis, stub: StubLLM, root: str) -> tuple[RunRecord, RunRecord]:
    """Root and child records once the child runs on the other worker and its sub-calls were answered."""
    child = child_run_id(root, 0)

    def ready() -> tuple[RunRecord, RunRecord] | None:
        records = RunStore(r).get(root), RunStore(r).get(child)
        answered = sum(1 for q in stub.requests if "kid-0 prompt" in q.prompt and q.status == 200)
        if records[0] is None or records[1] is None or answered < 10:
            return None
        return (records[0], records[1]) if records[1].status is RunStatus.RUNNING else None

    root_record, child_record = wait_until(ready, 60, "the child running with its batch answered")
    assert child_record.worker != root_record.worker, "a free worker takes a child before its parent helps"
    return root_record, child_record


def worker_named(fleet: Fleet, hostname: str | None) -> WorkerProcess:
    return next(w for w in fleet.workers if w.name == hostname and w.alive)


def kill_and_replace(fleet: Fleet, worker: WorkerProcess) -> None:
    fleet.kill(worker)
    fleet.workers.remove(worker)
    fleet.start("rlm", name=worker.name.split("@")[0], concurrency=1, wait=False)


def test_the_worker_holding_a_child_dies_and_the_tree_completes(fleet: Fleet, stub: StubLLM, r: redis.Redis) -> None:
    root, _ = submit_root(r, stub)
    _, child = child_on_the_other_worker(r, stub, root)
    kill_and_replace(fleet, worker_named(fleet, child.worker))
    assert wait_status(r, root, timeout=90).status is RunStatus.SUCCEEDED, stored_record(r, root)
    assert stored_result(r, root)["outputs"]["answer"] == "kid-0:10"
    assert stored_record(r, child.spec.run_id).attempt == 2  # resumed by replay
    assert prompt_repeats(stub) == {}  # neither its root step nor its 10 answered prompts paid twice
    wait_until(lambda: LeaseRegistry(r, 3).live() == [], 30, "every sandbox released")
    fleet.wait_ready()


def test_the_worker_holding_the_root_dies_and_the_root_reattaches(fleet: Fleet, stub: StubLLM,
                                                                   r: redis.Redis) -> None:
    fleet.wait_ready()
    root, tree = submit_root(r, stub)
    root_record, child = child_on_the_other_worker(r, stub, root)
    kill_and_replace(fleet, worker_named(fleet, root_record.worker))
    assert wait_status(r, root, timeout=90).status is RunStatus.SUCCEEDED, stored_record(r, root)
    assert stored_result(r, root)["outputs"]["answer"] == "kid-0:10"
    assert stored_record(r, root).attempt == 2
    assert RunStore(r).children(root) == [child.spec.run_id]  # re-attached: no second child
    assert stored_record(r, child.spec.run_id).attempt == 1
    assert tree.calls["kid-"] == 1 and prompt_repeats(stub) == {}
    wait_until(lambda: LeaseRegistry(r, 3).live() == [], 30, "every sandbox released")
    fleet.wait_ready()
