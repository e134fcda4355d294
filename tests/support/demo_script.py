"""A scripted stand-in for the LLM behind ``rlmq demo monte-cristo`` (stdlib only: CI runs it before
rlmq is installed, as ``python3 -m tests.support.stub_llm --demo``).

The root model reads every chapter with one ``llm_query_batched`` and submits the 117 x 5 table; the
sub-model answers each chapter prompt with plausible wealth values and events (prison, treasure,
revenge).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from tests.support.stub_llm import ScriptedRoot

DEMO_PROMPT = re.compile(r"^Chapter (\d+): rate the wealth of (\[.*?\]) as JSON", re.MULTILINE)

DEMO = ScriptedRoot([
    "import json\n"
    "prompts = [f'Chapter {i + 1}: rate the wealth of {characters} as JSON.\\n' + c[:800] for i, c in enumerate(chapters)]\n"
    "answers = llm_query_batched(prompts)\nprint(len(answers), answers[0])",
    "rows = []\nfor i, a in enumerate(answers):\n    values = json.loads(a)\n"
    "    rows += [{'chapter': i + 1, 'character': n, 'wealth': int(values[n]['wealth']),\n"
    "              'event': values[n]['event']} for n in characters]\n"
    "SUBMIT(wealth_data=rows)",
])


def scripted_wealth(chapter: int) -> list[tuple[int, str]]:
    """(wealth, event) of the demo's five characters, in the order the demo lists them:
    Dantès, Danglars, Fernand, Villefort, Mercédès."""
    dantes = (3, "first mate of the Pharaon") if chapter < 8 else \
        (1, "imprisoned in the Château d'If") if chapter < 24 else (10, "the treasure of Monte Cristo")
    danglars = (min(10, 4 + chapter // 15), "his bank prospers") if chapter < 105 else (1, "ruined, flees Paris")
    fernand = (min(9, 2 + chapter // 12), "rises to Count of Morcerf") if chapter < 95 else \
        (2, "disgraced by the Janina affair")
    villefort = (7, "crown prosecutor") if chapter < 110 else (2, "loses his reason")
    mercedes = (2, "a fisherman's daughter") if chapter < 30 else \
        (8, "Countess of Morcerf") if chapter < 95 else (1, "gives up Fernand's fortune")
    return [dantes, danglars, fernand, villefort, mercedes]


def is_demo_prompt(messages: list[dict[str, Any]]) -> bool:
    return "wealth_data" in json.dumps(messages)


def demo_sub_answer(prompt: str) -> str:
    match = DEMO_PROMPT.search(prompt)
    if not match:
        return "unknown"
    names = ast.literal_eval(match.group(2))
    values = scripted_wealth(int(match.group(1)))
    return json.dumps({name: {"wealth": w, "event": e} for name, (w, e) in zip(names, values, strict=False)})
