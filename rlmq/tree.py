"""A tree of runs as readers see it: a root and its child runs (``rlm_query``), read from their records.

``read_tree`` walks ``keys.run_children_key`` down from a run (to ``depth`` levels); ``RunTree.usage``
sums every node's usage (root-LM and sub-calls, paid and uncached), the numbers ``rlmq status`` and
``status --json`` show for the tree and the root's result stores as ``tree_usage``; ``format_tree_trace``
nests each child's trace under the parent's step that started it (``rlmq trace --depth N``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rlmq.store.records import RunRecord, RunStore, Usage

__all__ = ["RunTree", "format_tree_trace", "read_tree"]


@dataclass
class RunTree:
    record: RunRecord
    children: list[RunTree] = field(default_factory=list)

    def nodes(self) -> Iterator[RunTree]:
        """This run and every descendant read, depth first."""
        yield self
        for child in self.children:
            yield from child.nodes()

    def usage(self, own: Usage | None = None) -> Usage:
        """Every node's usage summed (as last reported by each run); ``own``: this run's, if newer."""
        total = Usage()
        for node in self.nodes():
            used = own if own is not None and node is self else node.record.progress.usage
            total = Usage(root=total.root.plus(used.root), sub=total.sub.plus(used.sub))
        return total

    def descendants(self) -> tuple[int, int]:
        """(live, finished) runs below this one."""
        below = [n.record for n in self.nodes() if n is not self]
        finished = sum(1 for r in below if r.status.finished)
        return len(below) - finished, finished

    def to_json_dict(self) -> dict[str, Any]:
        """The tree's totals and every node's own numbers (``rlmq status --json``'s ``tree``)."""
        live, finished = self.descendants()
        return {"usage": self.usage().to_json_dict(), "children_live": live, "children_finished": finished,
                "nodes": [{"run_id": n.record.spec.run_id, "parent": n.record.spec.parent or None,
                           "depth": n.record.spec.depth, "status": n.record.status.value,
                           "error": n.record.error, "usage": n.record.progress.usage.to_json_dict()}
                          for n in self.nodes()]}


def read_tree(store: RunStore, run_id: str, *, depth: int | None = None) -> RunTree | None:
    """The run and its descendants down to ``depth`` levels below it (None: all)."""
    record = store.get(run_id)
    if record is None:
        return None
    tree = RunTree(record)
    if depth is None or depth > 0:
        for child_id in store.children(run_id):
            child = read_tree(store, child_id, depth=None if depth is None else depth - 1)
            if child is not None:
                tree.children.append(child)
    return tree


def format_tree_trace(tree: RunTree, read_steps: Callable[[str], list[dict[str, Any]]],
                      format_one: Callable[[RunRecord, list[dict[str, Any]]], str]) -> str:
    """Each run's trace (``format_one``), its children's nested under the step that started them."""
    steps = read_steps(tree.record.spec.run_id)
    text = format_one(tree.record, steps)
    if not tree.children:
        return text
    by_step: dict[int, list[RunTree]] = {}
    for child in tree.children:
        by_step.setdefault(child.record.spec.parent_step, []).append(child)
    blocks = text.split("\n\n── step ")
    out = [blocks[0]]
    for block in blocks[1:]:
        number = int(block.split(" ", 1)[0]) if block[:1].isdigit() else 0
        out.append("── step " + block + _nested(by_step.pop(number, []), read_steps, format_one))
    rest = [child for children in by_step.values() for child in children]  # a step not finished yet
    return "\n\n".join(out) + _nested(rest, read_steps, format_one)


def _nested(children: list[RunTree], read_steps: Callable[[str], list[dict[str, Any]]],
            format_one: Callable[[RunRecord, list[dict[str, Any]]], str]) -> str:
    parts = []
    for child in children:
        inner = format_tree_trace(child, read_steps, format_one)
        parts.append("\n".join("  │ " + line for line in inner.splitlines()))
    return "".join("\n  │\n" + part for part in parts)
