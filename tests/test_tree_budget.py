"""A tree's one budget (``workers.tree_budget``) on a real Redis: reservations, the one reason, the
live-sandbox slots that keep room for the chain below, the root's deadline, the summed spending."""

from __future__ import annotations

import time

import pytest
import redis

from rlmq.settings import Settings
from rlmq.store.records import RunSpec, RunStatus, RunStore
from workers.budget import BudgetExceeded
from workers.children import CHILD_SIGNATURE, Children, check_request, child_run_id, prompt_of
from workers.tree_budget import TreeBudget, TreeRefused

ROOT = "root0"


def node(r: redis.Redis, run_id: str, depth: int, *, lease: float = 30.0, **limits: object) -> TreeBudget:
    spec = RunSpec(run_id=run_id, signature="task: str, context -> answer: str", inputs={},
                   root="" if depth == 0 else ROOT, depth=depth, parent="" if depth == 0 else ROOT)
    settings = Settings(**{"max_depth": 3, **limits})  # type: ignore[arg-type]
    return TreeBudget(r, spec, settings, lease_seconds=lease, expire_seconds=60)


def test_sub_calls_are_reserved_for_the_whole_tree_and_the_first_reason_stands(redis_client: redis.Redis) -> None:
    root, child = node(redis_client, ROOT, 0, max_llm_calls=10), node(redis_client, "root0.0", 1, max_llm_calls=10)
    root.reserve_calls(4)
    child.reserve_calls(6)
    with pytest.raises(BudgetExceeded, match="the tree's 10 sub-calls are spent"):
        child.reserve_calls(1)
    assert root.stopped() is not None and "sub-calls are spent" in root.stopped()  # type: ignore[operator]
    assert root.trip("another reason") == child.stopped()  # named once: the first one
    with pytest.raises(BudgetExceeded, match="sub-calls are spent"):
        root.reserve_child()  # a stopped tree reserves nothing more


def test_max_children_counts_the_whole_tree(redis_client: redis.Redis) -> None:
    nodes = [node(redis_client, ROOT, 0, max_children=2), node(redis_client, "root0.0", 1, max_children=2)]
    nodes[0].reserve_child()
    nodes[1].reserve_child()
    with pytest.raises(BudgetExceeded, match="max_children: the tree has started its 2 child runs"):
        nodes[0].reserve_child()


def test_sandbox_slots_keep_room_for_the_chain_below(redis_client: redis.Redis) -> None:
    limits = {"max_sandboxes": 3}
    root, a, b = (node(redis_client, ROOT, 0, **limits), node(redis_client, "root0.0", 1, **limits),
                  node(redis_client, "root0.1", 1, **limits))
    grandchild = node(redis_client, "root0.0.0", 2, **limits)
    assert root._sandbox_slot() == 1 and a._sandbox_slot() == 1
    assert b._sandbox_slot() == 0  # a second child would leave no slot for either child's own children
    assert grandchild._sandbox_slot() == 1 and root.live_sandboxes() == 3
    grandchild.release_sandbox()
    assert b._sandbox_slot() == 0  # still: a's chain keeps its room until a ends
    a.release_sandbox()
    assert b._sandbox_slot() == 1
    with pytest.raises(TreeRefused, match="max_sandboxes=2 cannot hold a tree of max_depth=3"):
        node(redis_client, ROOT, 0, max_sandboxes=2)


def test_a_dead_runs_sandbox_slot_comes_back_when_its_lease_expires(redis_client: redis.Redis) -> None:
    dead = [node(redis_client, f"root0.{i}", 1, lease=0.2, max_sandboxes=3, max_depth=2) for i in range(3)]
    other = node(redis_client, "root0.3", 1, max_sandboxes=3, max_depth=2)
    assert [n._sandbox_slot() for n in dead] == [1, 1, 1] and other._sandbox_slot() == 0
    time.sleep(0.3)  # nobody renewed them
    assert other._sandbox_slot() == 1


def test_a_child_gets_what_is_left_of_the_roots_time_and_the_tree_sums_what_it_paid(redis_client: redis.Redis) -> None:
    root, child = node(redis_client, ROOT, 0), node(redis_client, "root0.0", 1)
    assert root.time_left(60.0) == 60.0
    time.sleep(0.2)
    left = child.time_left(60.0)
    assert left is not None and 59.0 < left < 59.85
    assert root.time_left(None) is None
    root.paid(0.5, 100)
    assert child.paid(0.25, 50) == (0.75, 150)
    assert root.paid(0.75, 120) == (1.0, 170)  # only what it paid since its last report is added


def test_what_sandbox_code_may_ask_for() -> None:
    assert check_request(["a", "b"], None) == [None, None]
    assert prompt_of("t", {"k": [1]}) == 't\n\nContext:\n{"k": [1]}' and prompt_of("t", None) == "t"
    assert child_run_id(child_run_id("r", 2), 0) == "r.2.0"
    with pytest.raises(ValueError, match="2 task\\(s\\) need as many contexts"):
        check_request(["a", "b"], [1])
    with pytest.raises(TypeError, match="JSON value"):
        check_request(["a"], [object()])
    with pytest.raises(TypeError, match="non-empty task string"):
        check_request([""], None)


def test_a_parent_that_stops_waiting_cancels_its_children_only_when_cancelled(redis_client: redis.Redis) -> None:
    """A parent fenced off by its own next attempt must leave its children to that attempt (it re-attaches)."""
    store = RunStore(redis_client)
    parent = RunSpec(run_id=ROOT, signature="question -> answer", inputs={}, options={"max_depth": 2})
    children = Children(parent, client=redis_client, store=store, app=None, run_child=lambda run_id: None,
                        should_stop=lambda: True, tree=node(redis_client, ROOT, 0), current_step=lambda: 1)
    child = RunSpec(run_id=child_run_id(ROOT, 0), signature=CHILD_SIGNATURE, inputs={}, parent=ROOT, root=ROOT,
                    depth=1)
    assert store.create_child(child) and not store.create_child(child)  # a replay finds it: not created twice
    assert children.query(["t"], [None]) == [f"[ERROR] child run {child.run_id}: its parent stopped waiting"]
    assert store.status(child.run_id) is RunStatus.QUEUED and not store.cancel_requested(child.run_id)
    store.request_cancel(ROOT)  # now the parent is cancelled: its queued child goes with it
    children._gather([child.run_id])
    assert store.status(child.run_id) is RunStatus.CANCELLED and store.cancel_requested(child.run_id)


def test_calls_in_flight_are_reserved_so_nodes_at_once_cannot_all_pass_the_rest(redis_client: redis.Redis) -> None:
    a, b = node(redis_client, ROOT, 0), node(redis_client, "root0.0", 1)
    assert a.charge(0.0, 1000, estimate=(0.0, 1500), max_tokens=4000) == ("", 0.0, 2500)
    assert a.paid(0.0, 1000) == (0.0, 2500)  # a tick settles what a paid and keeps its call in flight reserved
    # b's step of 1,600 would fit what was paid (1,000) but not that plus a's step in flight
    assert b.charge(0.0, 0, estimate=(0.0, 1600), max_tokens=4000)[0] == "tokens"
    assert b.charge(0.0, 0, estimate=(0.0, 1400), max_tokens=4000) == ("", 0.0, 3900)
    # a's step is paid (1,600 in all, more than estimated): its estimate is replaced by what it paid
    assert a.charge(0.0, 2600)[1:] == (0.0, 4000)
    assert b.charge(0.0, 1300)[1:] == (0.0, 3900)  # b's estimate released too: the real spend stands
    assert b.charge(0.5, 1300, estimate=(0.2, 0), max_cost=0.6)[0] == "cost"
    # a child's first step (no step of its own yet) is estimated by the tree's last one
    assert b.step_size(1200, 300) == (1200, 300) and node(redis_client, "root0.1", 1).step_size(0, 0) == (1200, 300)
