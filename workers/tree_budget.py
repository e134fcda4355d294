"""One budget for a tree of runs (``max_depth`` > 1): its ledger in Redis, shared by every node.

- ``max_llm_calls``: the tree's sub-calls, reserved (``workers/lua/tree_reserve.lua``) before a batch is
  sent, on top of each run's own DSPy count, so a child cannot spend what the tree no longer has.
- ``max_children``: child runs started in the whole tree, reserved before a child is recorded (64 by
  default, and a limit a run may only lower: sandbox code decides how many children it asks for).
- ``max_cost`` / ``max_tokens``: every node adds what it paid to the ledger (before each check, each tick and
  at its end), and before a step or a batch reserves that call's estimate in the tree's totals
  (``workers/lua/tree_spend.lua``) until its next check or its end replaces the estimate by what was paid:
  nodes running at once see each other's calls in flight, so a child cannot spend what the tree no longer
  has (beyond how far a call's real size exceeds its estimate).
- ``time_limit``: the root's deadline, written once; a child gets what is left of it as its own limit.
- ``max_sandboxes``: live sandboxes in the tree at once (``workers/lua/tree_sandbox.lua``). A run at depth
  d takes a slot only if ``max_depth - 1 - d`` stay free for the chain below it, so waiting parents can
  never hold every slot their descendants need; a tree needs ``max_sandboxes >= max_depth``. Slots are
  leases renewed by the run's tick, so a dead worker's slots come back.

When any node meets a limit (or its own ``max_cost``/``max_tokens``/``time_limit``), the ledger records
the reason once (``stopped``); every node then ends STOPPED with it: before its next step, when it
waits for children, and when it would start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

from rlmq.settings import Settings
from rlmq.store import keys, replies
from rlmq.store.lua import lua_scripts
from rlmq.store.records import RunSpec
from workers.budget import BudgetExceeded

__all__ = ["TreeBudget", "TreeRefused"]

_LUA = lua_scripts("workers")
SANDBOX_WAIT_POLL = 0.2  # seconds between tries for a sandbox slot


class TreeRefused(ValueError):
    """The tree's limits cannot work (e.g. fewer sandboxes than levels); one line."""


class TreeBudget:
    def __init__(self, client: redis.Redis, spec: RunSpec, settings: Settings, *, lease_seconds: float,
                 expire_seconds: int) -> None:
        self.redis = client
        self.run_id, self.depth = spec.run_id, spec.depth
        self.key, self.sandboxes_key = keys.tree_key(spec.root_id), keys.tree_sandboxes_key(spec.root_id)
        self.max_depth = settings.max_depth
        self.max_llm_calls, self.max_children = settings.max_llm_calls, settings.max_children
        self.max_sandboxes = settings.max_sandboxes
        self.lease_seconds, self.expire_seconds = lease_seconds, expire_seconds
        self._synced: tuple[float, int] = (0.0, 0)  # what this run has added to the tree's paid totals
        self._estimate: tuple[float, int] = (0.0, 0)  # this run's call in flight, reserved in the totals too
        self._sync_lock = threading.Lock()
        if self.max_sandboxes is not None and self.max_sandboxes < self.max_depth:
            raise TreeRefused(f"max_sandboxes={self.max_sandboxes} cannot hold a tree of max_depth={self.max_depth}: "
                              f"each level of a chain keeps its sandbox while its children run")

    def time_left(self, time_limit: float | None) -> float | None:
        """This node's time limit: the root sets the tree's deadline, a child gets what is left of it."""
        if time_limit is None:
            return None
        if self.depth == 0:
            self.redis.hsetnx(self.key, "deadline", repr(time.time() + time_limit))
            self.redis.expire(self.key, self.expire_seconds)
            return time_limit
        deadline = replies.text(self.redis.hget(self.key, "deadline") or b"")
        return max(0.001, float(deadline) - time.time()) if deadline else time_limit

    def paid(self, cost: float, tokens: int) -> tuple[float, int]:
        """Add what this run paid since it last settled to the tree's totals, keeping its call in flight
        reserved (the run's tick); the tree's (dollars, tokens)."""
        _, total_cost, total_tokens = self.charge(cost, tokens, estimate=None)
        return total_cost, total_tokens

    def charge(self, cost: float, tokens: int, *, estimate: tuple[float, int] | None = (0.0, 0),
               max_cost: float | None = None, max_tokens: int | None = None) -> tuple[str, float, int]:
        """Settle what this run paid (``cost``, ``tokens`` so far; its previous estimate is now part of it)
        and reserve ``estimate`` for its next call (None: keep the one reserved) unless the tree's totals
        would pass a limit: (``''``, ``'cost'`` or ``'tokens'`` refused, the tree's dollars, its tokens)."""
        with self._sync_lock:
            est_cost, est_tokens = self._estimate if estimate is None else (float(estimate[0]), int(estimate[1]))
            out = _LUA.run(self.redis, "tree_spend", [self.key], {
                "paid_cost": cost - self._synced[0], "paid_tokens": tokens - self._synced[1],
                "old_cost": self._estimate[0], "old_tokens": self._estimate[1],
                "est_cost": est_cost, "est_tokens": est_tokens,
                "max_cost": -1 if max_cost is None else max_cost, "max_tokens": -1 if max_tokens is None else max_tokens,
                "ttl": self.expire_seconds})
            refused = replies.text(out[0])
            self._synced, self._estimate = (cost, tokens), ((0.0, 0) if refused else (est_cost, est_tokens))
        return refused, float(replies.text(out[1])), int(replies.text(out[2]))

    def step_size(self, tokens_in: int, tokens_out: int) -> tuple[int, int]:
        """A root step's size for estimating the next one: a run's own last step once it has one (noted for the
        tree), else the tree's last noted step, so a child's first step is not estimated at nothing."""
        if tokens_in or tokens_out:
            self.redis.hset(self.key, mapping={"step_in": tokens_in, "step_out": tokens_out})
            return tokens_in, tokens_out
        step_in, step_out = self.redis.hmget(self.key, ["step_in", "step_out"])
        return int(step_in or 0), int(step_out or 0)

    def stopped(self) -> str | None:
        """The reason the tree stopped, or None."""
        raw = self.redis.hget(self.key, "stopped")
        return replies.text(raw) if raw else None

    def trip(self, reason: str) -> str:
        """Record the tree's reason (the first one stands) and return it."""
        self.redis.hsetnx(self.key, "stopped", reason)
        self.redis.expire(self.key, self.expire_seconds)
        return self.stopped() or reason

    def reserve_calls(self, n: int) -> None:
        self._reserve("calls", n, self.max_llm_calls, f"max_llm_calls: the tree's {self.max_llm_calls} sub-calls "
                                                      f"are spent (a batch of {n} refused)")

    def reserve_child(self) -> None:
        self._reserve("children", 1, self.max_children,
                      f"max_children: the tree has started its {self.max_children} child runs")

    def _reserve(self, field: str, n: int, limit: int, reason: str) -> None:
        out = int(_LUA.run(self.redis, "tree_reserve", [self.key], {
            "field": field, "n": n, "limit": limit, "expire_s": self.expire_seconds}))
        if out == 1:
            return
        raise BudgetExceeded(self.stopped() if out == -1 else self.trip(reason))

    def take_sandbox(self, should_stop: Callable[[], bool]) -> None:
        """Wait for a live-sandbox slot (``max_sandboxes``); BudgetExceeded if the tree stops meanwhile."""
        while self.max_sandboxes is not None:
            out = self._sandbox_slot()
            if out == 1:
                return
            if out == -1:
                raise BudgetExceeded(self.stopped() or "the tree stopped")
            if should_stop():
                return  # the run is stopping: its sandbox is refused by the run's own stop
            time.sleep(SANDBOX_WAIT_POLL)

    def renew_sandbox(self) -> None:
        """The run's tick: keep its slot while its sandbox lives."""
        if self.max_sandboxes is not None and self.redis.zscore(self.sandboxes_key, self.run_id) is not None:
            self._sandbox_slot()

    def release_sandbox(self) -> None:
        if self.max_sandboxes is not None:
            self.redis.zrem(self.sandboxes_key, self.run_id)

    def live_sandboxes(self) -> int:
        return int(self.redis.zcount(self.sandboxes_key, time.time(), "+inf"))

    def _sandbox_slot(self) -> int:
        return int(_LUA.run(self.redis, "tree_sandbox", [self.sandboxes_key, self.key], {
            "run_id": self.run_id, "limit": self.max_sandboxes, "keep_free": self.max_depth - 1 - self.depth,
            "now": time.time(), "lease_s": self.lease_seconds, "expire_s": self.expire_seconds}))
