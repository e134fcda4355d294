"""A scripted root LM for a tree of runs (``rlm_query``): each run's script is chosen by its inputs.

A child run's action prompt shows its ``task`` input under ``variables_info``; :class:`ScriptedTree`
picks the script of the first marker found there (``scripts`` in order: put the more specific
markers first), the root's script when none is, and serves step k of it as ``ScriptedRoot`` does.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from tests.support.stub_llm import Messages, Responder, chat_adapter_reply, last_user_text, repl_steps_done, route

__all__ = ["ScriptedTree", "tree_responder"]


def variables_section(user_text: str) -> str:
    """The prompt's ``variables_info`` field: the run's inputs, never the REPL's output."""
    return user_text.split("[[ ## variables_info ## ]]", 1)[-1].split("[[ ## repl_history ## ]]", 1)[0]


class ScriptedTree:
    def __init__(self, root: list[str], scripts: list[tuple[str, list[str]]]) -> None:
        self.root = root
        self.scripts = scripts
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()  # action prompts served per marker ("" for the root)

    def __call__(self, messages: Messages, body: dict[str, Any]) -> str:
        text = last_user_text(messages)
        found = variables_section(text)
        marker, steps = next(((m, s) for m, s in self.scripts if m in found), ("", self.root))
        k = repl_steps_done(text)
        with self._lock:
            self.calls[marker] += 1
        code = steps[k] if k < len(steps) else 'print("no more steps")'
        return chat_adapter_reply({"reasoning": f"Scripted step {k + 1} ({marker or 'root'}).",
                                   "code": f"```python\n{code}\n```"})


def tree_responder(tree: ScriptedTree, sub_prefix: str = "sub:") -> Responder:
    """RLM action prompts to ``tree``; any other prompt is answered ``sub:<its text>``."""
    return route(root=tree, sub=lambda prompt: sub_prefix + prompt)

