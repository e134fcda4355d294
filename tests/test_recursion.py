"""Child runs over the fleet (``rlm_query``): a tree of real runs, each in its own local sandbox, on one
rlm worker of two slots and one llm worker, with the stub LLM scripting every run by its task."""

from __future__ import annotations

import json
import time
from functools import partial
from multiprocessing.context import ForkServerContext
from pathlib import Path

import pytest
import redis

from rlmq.client import Client
from rlmq.store.blobs import put_blobs
from rlmq.store.records import RunSpec, RunStatus, RunStore, new_run_id
from rlmq.ui import create_app
from tests.support.cli import cli_env, rlmq_forked
from tests.support.fleet import Fleet, fleet_fixture, redis_url_of
from tests.support.records import stored_record, stored_result
from tests.support.reliability import wait_status
from tests.support.rlm_tree import ScriptedTree, tree_responder
from tests.support.stub_llm import StubLLM
from workers.children import child_run_id
from workers.sandbox_registry import LeaseRegistry

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_stub")]

SIGNATURE = "question: str -> answer: str"

fleet = fleet_fixture(
    env={"RLMQ_LM": "openai/scripted-root", "RLMQ_SUB_LM": "openai/stub-sub", "OPENAI_API_KEY": "sk-test",
         "RLMQ_RATE_LIMIT_RPS": "1000", "RLMQ_RATE_LIMIT_BURST": "1000"},
    workers=[("rlm", "rlm1", 2), ("llm", "llmA", 16)])


def submit_tree(r: redis.Redis, stub: StubLLM, tree: ScriptedTree, **options: object) -> str:
    stub.set_responder(tree_responder(tree))
    run_id = new_run_id()
    spec = RunSpec(run_id=run_id, signature=SIGNATURE, inputs=put_blobs(r, {"question": "the tree question"}),
                   options={"max_iters": 3, **options})
    Client(redis_url_of(r)).enqueue(spec)
    return run_id


def wait_finished(r: redis.Redis, run_id: str, timeout: float = 150.0) -> RunStatus:
    return wait_status(r, run_id, timeout).status


def tree_of(r: redis.Redis, run_id: str) -> list[str]:
    """The run and every descendant, depth first."""
    store = RunStore(r)
    out = [run_id]
    for child in store.children(run_id):
        out += tree_of(r, child)
    return out


ROOT_BATCH = ('answers = rlm_query_batched([f"child-{i}" for i in range(4)], [{"i": i} for i in range(4)])\n'
              'SUBMIT(answer=" | ".join(answers))')
CHILD = ('g = rlm_query("grand-of-" + task, context)\n'
         'subs = llm_query_batched([f"{task} prompt {j}" for j in range(10)])\n'
         'SUBMIT(answer=f"{task}[{g}; {sum(s.startswith(\'sub:\') for s in subs)} subs]")')
GRANDCHILD = 'SUBMIT(answer="G(" + rlm_query("leaf of " + task) + ")")'


def test_a_tree_of_runs_answers_through_its_children(fleet: Fleet, stub: StubLLM, r: redis.Redis,
                                                    tmp_path: Path, mp_context: ForkServerContext) -> None:
    tree = ScriptedTree([ROOT_BATCH], [("grand-of-", [GRANDCHILD]), ("child-", [CHILD])])
    root = submit_tree(r, stub, tree, max_depth=3)
    assert wait_finished(r, root) is RunStatus.SUCCEEDED, stored_record(r, root)
    expected = " | ".join(f"child-{i}[G(sub:leaf of grand-of-child-{i}); 10 subs]" for i in range(4))
    assert stored_result(r, root)["outputs"]["answer"] == expected

    nodes = tree_of(r, root)
    assert len(nodes) == 1 + 4 + 4  # the grandchildren's rlm_query answered as llm_query (the deepest level)
    assert nodes[1] == child_run_id(root, 0) and nodes[2] == child_run_id(child_run_id(root, 0), 0)
    records = {n: stored_record(r, n) for n in nodes}
    assert all(rec.status is RunStatus.SUCCEEDED for rec in records.values())
    assert {n: rec.spec.depth for n, rec in records.items()} == {n: n.count(".") for n in nodes}
    assert all(rec.spec.root_id == root for rec in records.values())
    assert len({rec.progress.sandbox.id for rec in records.values() if rec.progress.sandbox}) == 9  # one each

    calls = sum(stored_result(r, n)["usage"]["total"]["calls"] for n in nodes)
    assert calls == stub.request_count == 9 + 4 * 10 + 4  # 9 root steps, 40 sub-calls, 4 leaves
    assert stored_result(r, root)["tree_usage"]["total"]["calls"] == calls  # rolled up in the root's result
    assert tree.calls == {"": 1, "child-": 4, "grand-of-": 4}
    roots = [q.prompt for q in stub.requests if q.model == "scripted-root"]
    assert all("`rlm_query(task, context=None)`" in prompt for prompt in roots)  # the model reads how to use it
    assert LeaseRegistry(r, 30).live() == []
    see_the_tree(r, root, nodes, tmp_path, mp_context)


def see_the_tree(r: redis.Redis, root: str, nodes: list[str], tmp_path: Path, mp_context: ForkServerContext) -> None:
    """``rlmq status`` (text and JSON), ``trace`` (nested, ``--depth``), ``list`` (roots, ``--all``), the run page."""
    env = cli_env(tmp_path, REDIS_URL=redis_url_of(r))
    rlmq = partial(rlmq_forked, mp_context)
    status = rlmq("status", root, env=env, cwd=tmp_path)
    assert status.code == 0 and "tree: 8 child run(s), 0 live, 8 finished · root 9 calls" in status.stdout, status
    document = json.loads(rlmq("status", root, "--json", env=env, cwd=tmp_path).stdout)["tree"]
    assert document["usage"]["total"]["calls"] == 53 and len(document["nodes"]) == 9
    assert {n["run_id"]: n["depth"] for n in document["nodes"]} == {n: n.count(".") for n in nodes}
    trace = rlmq("trace", root, "--color", "never", env=env, cwd=tmp_path).stdout
    step = trace.index("── step 1")
    first_child = trace.index(f"  │ run {child_run_id(root, 0)}")
    assert step < first_child < trace.index(f"  │   │ run {child_run_id(child_run_id(root, 0), 0)}")
    shallow = rlmq("trace", root, "--depth", "1", "--color", "never", env=env, cwd=tmp_path).stdout
    assert f"run {child_run_id(root, 3)}" in shallow and f"run {child_run_id(child_run_id(root, 0), 0)}" not in shallow
    page = create_app(Client(redis_url_of(r))).test_client()
    html = page.get(f"/run/{root}").get_data(as_text=True)
    assert f'href="/run/{child_run_id(root, 3)}"' in html and "the tree: root 9 calls" in html
    assert f'href="/run/{root}"' in page.get(f"/run/{child_run_id(root, 0)}").get_data(as_text=True)
    listed = rlmq("list", env=env, cwd=tmp_path).stdout.split()
    assert root in listed and child_run_id(root, 0) not in listed
    assert set(nodes) <= set(rlmq("list", "--all", env=env, cwd=tmp_path).stdout.split())


def test_a_tree_deeper_than_the_slots_completes_on_two_slots(fleet: Fleet, stub: StubLLM, r: redis.Redis) -> None:
    """Fan-out 4 at two levels (21 runs, each holding a sandbox while it waits) on one worker of 2 slots:
    waiting parents run their unclaimed children themselves."""
    fan = 'SUBMIT(answer=",".join(rlm_query_batched([f"leaf-{task[5:]}-{i}" for i in range(4)])))'
    root_step = 'SUBMIT(answer=";".join(rlm_query_batched([f"node-{i}" for i in range(4)])))'
    tree = ScriptedTree([root_step], [("leaf-", ['SUBMIT(answer=task)']), ("node-", [fan])])
    started = time.monotonic()
    root = submit_tree(r, stub, tree, max_depth=3)
    assert wait_finished(r, root) is RunStatus.SUCCEEDED, stored_record(r, root)
    print(f"21-run tree on 2 slots: {time.monotonic() - started:.1f}s")
    expected = ";".join(",".join(f"leaf-{i}-{j}" for j in range(4)) for i in range(4))
    assert stored_result(r, root)["outputs"]["answer"] == expected
    assert len(tree_of(r, root)) == 21
    assert LeaseRegistry(r, 30).live() == []


def test_cancelling_the_root_cancels_the_tree_and_deletes_every_sandbox(fleet: Fleet, stub: StubLLM,
                                                                         r: redis.Redis) -> None:
    root_step = 'SUBMIT(answer=";".join(rlm_query_batched([f"slow-{i}" for i in range(3)])))'
    tree = ScriptedTree([root_step], [("slow-", ["import time\ntime.sleep(60)\nSUBMIT(answer=task)"])])
    root = submit_tree(r, stub, tree, max_depth=2)
    store = RunStore(r)
    deadline = time.monotonic() + 60
    while not (len(store.children(root)) == 3 and all(
            store.status(c) is RunStatus.RUNNING for c in store.children(root))):
        assert time.monotonic() < deadline, [store.status(c) for c in store.children(root)]
        time.sleep(0.1)
    wait_until_sandboxes(r, 4)
    started = time.monotonic()
    Client(redis_url_of(r)).cancel(root)
    for run_id in tree_of(r, root):
        assert wait_finished(r, run_id, timeout=30) is RunStatus.CANCELLED, stored_record(r, run_id)
    print(f"tree of 4 cancelled in {time.monotonic() - started:.1f}s")
    wait_until_sandboxes(r, 0)


def wait_until_sandboxes(r: redis.Redis, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(LeaseRegistry(r, 30).live()) != n:
        assert time.monotonic() < deadline, f"{len(LeaseRegistry(r, 30).live())} live sandboxes, not {n}"
        time.sleep(0.1)


def test_a_tree_over_its_sub_call_budget_stops_before_paying_more(fleet: Fleet, stub: StubLLM,
                                                                   r: redis.Redis) -> None:
    tree = ScriptedTree([ROOT_BATCH], [("grand-of-", [GRANDCHILD]), ("child-", [CHILD])])
    root = submit_tree(r, stub, tree, max_depth=3, max_llm_calls=25)  # the tree needs 44
    assert wait_finished(r, root) is RunStatus.STOPPED, stored_record(r, root)
    nodes = tree_of(r, root)
    for run_id in nodes:
        wait_finished(r, run_id, timeout=60)
    records = [stored_record(r, n) for n in nodes]
    reason = stored_record(r, root).error
    assert reason is not None and "max_llm_calls: the tree's 25 sub-calls are spent" in reason
    stopped = [rec for rec in records if rec.status is RunStatus.STOPPED]
    assert all(rec.error == reason for rec in stopped)  # one reason, named as it was met
    # Nodes that answered before the budget ran out keep their answers; none ends otherwise.
    assert all(rec.status in (RunStatus.STOPPED, RunStatus.SUCCEEDED) for rec in records)
    sub_calls = sum(1 for q in stub.requests if q.model == "stub-sub")
    assert 0 < sub_calls <= 25  # the stub's count: the excess was never paid
    assert LeaseRegistry(r, 30).live() == []


def test_max_sandboxes_bounds_the_live_sandboxes_of_a_tree(fleet: Fleet, stub: StubLLM, r: redis.Redis) -> None:
    root_step = 'SUBMIT(answer=";".join(rlm_query_batched([f"kid-{i}" for i in range(4)])))'
    tree = ScriptedTree([root_step], [("kid-", ["import time\ntime.sleep(0.5)\nSUBMIT(answer=task)"])])
    root = submit_tree(r, stub, tree, max_depth=2, max_sandboxes=2)
    peak = 0
    while not RunStore(r).status(root).finished:  # type: ignore[union-attr]
        peak = max(peak, len(LeaseRegistry(r, 30).live()))
        time.sleep(0.05)
    assert stored_record(r, root).status is RunStatus.SUCCEEDED, stored_record(r, root)
    assert stored_result(r, root)["outputs"]["answer"] == "kid-0;kid-1;kid-2;kid-3"
    assert peak == 2  # sampled every 50 ms: the root and one child at a time


def test_max_tokens_counts_the_whole_tree(fleet: Fleet, stub: StubLLM, r: redis.Redis) -> None:
    """Each run alone fits 4,000 tokens (two steps of ~1,350); the tree (ten steps) does not, and stops."""
    root_step = 'print(rlm_query_batched([f"kid-{i}" for i in range(4)]))'
    tree = ScriptedTree([root_step, 'SUBMIT(answer="done")'],
                        [("kid-", ['print(task)', 'SUBMIT(answer=task)'])])
    root = submit_tree(r, stub, tree, max_depth=2, max_tokens=4000)
    assert wait_finished(r, root) is RunStatus.STOPPED, stored_record(r, root)
    assert "max tokens" in (stored_record(r, root).error or "")
    served = [p + c for p, c in stub._served]
    print(f"the tree paid {sum(served)} tokens in {len(served)} steps for its max_tokens=4000")
    assert max(served) < 2000 and sum(served) <= 4000 + max(served)  # past it by one step's estimate at most
    assert tree.calls[""] == 1  # the root's 2nd step was refused before it was paid
    for run_id in tree_of(r, root):
        assert wait_finished(r, run_id, timeout=30) in (RunStatus.STOPPED, RunStatus.SUCCEEDED)
    wait_until_sandboxes(r, 0)


def test_the_roots_time_limit_is_the_whole_trees(fleet: Fleet, stub: StubLLM, r: redis.Redis) -> None:
    """The root spends 4 of its 6 s before it starts two children: they stop at the root's deadline (~6 s),
    not 6 s after their own start (~10 s)."""
    root_step = ('import time\ntime.sleep(4)\n'
                 'SUBMIT(answer=";".join(rlm_query_batched([f"slow-{i}" for i in range(2)])))')
    tree = ScriptedTree([root_step], [("slow-", ["import time\ntime.sleep(60)\nSUBMIT(answer=task)"])])
    root = submit_tree(r, stub, tree, max_depth=2, time_limit=6)
    statuses = {run_id: wait_finished(r, run_id, timeout=40) for run_id in [root, *wait_children(r, root, 2)]}
    assert set(statuses.values()) == {RunStatus.STOPPED}, statuses
    deadline = (stored_record(r, root).started_at or 0) + 6
    late = {n: (stored_record(r, n).finished_at or 0) - deadline for n in statuses}
    # seconds past the root's deadline: a child on its own clock would end >= 4 s past it (it started 4 s
    # in); the tick (1 s) and the sandbox's deletion take the rest, longer on a loaded box (2.5 s flaked)
    assert all(seconds < 3.5 for seconds in late.values()), late
    assert "time limit" in (stored_record(r, root).error or "")
    wait_until_sandboxes(r, 0)


def wait_children(r: redis.Redis, run_id: str, n: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(RunStore(r).children(run_id)) < n:
        assert time.monotonic() < deadline, f"{run_id} has not started {n} children"
        time.sleep(0.1)
    return RunStore(r).children(run_id)
