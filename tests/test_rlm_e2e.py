"""dspy.RLM end to end on the sandbox bridge: a scripted root LM and a sub-LM, both served over HTTP by
the stub endpoint through the real dspy.LM, over the Monte Cristo chapters."""

from __future__ import annotations

import dspy
import pytest

from broker_bridge import interpreter_factory
from rlmq.demo import CORPUS
from rlmq.inputs import load_input_value
from tests.support.stub_llm import ScriptedRoot, richest_in_chapter, route

CHAPTER_PROMPT = "Which character is richest in chapter {n}? Answer with one name.\n\n{text}"


@pytest.fixture(scope="module")
def chapters() -> list[str]:
    value = load_input_value(f"@{CORPUS}", split="chapters")
    assert isinstance(value, list) and len(value) == 117
    return value


sub_answer = richest_in_chapter("Marseilles")


def sub_prompts(stub) -> list[str]:
    return [r.prompt for r in stub.requests if "richest in chapter" in r.prompt and "[[ ## repl_history ## ]]" not in r.prompt]


def lms(stub):
    root = dspy.LM("openai/scripted-root", api_base=stub.api_base, api_key="stub", cache=False)
    sub = dspy.LM("openai/stub-sub", api_base=stub.api_base, api_key="stub", cache=False)
    return root, sub


def run(stub, chapters, steps, *, max_llm_calls=200, max_iters=6):
    root_script = ScriptedRoot(steps)
    stub.set_responder(route(root=root_script, sub=sub_answer))
    root, sub = lms(stub)
    rlm = dspy.RLM(
        "chapters: list[str] -> richest: list[dict]",
        max_iters=max_iters,
        max_llm_calls=max_llm_calls,
        sub_lm=sub,
        interpreter_factory=interpreter_factory("local"),
    )
    with dspy.context(lm=root):
        return rlm(chapters=chapters), root_script


BATCH_STEPS = [
    "print(len(chapters), chapters[0][:40])",
    "prompts = [" + repr(CHAPTER_PROMPT) + ".format(n=i + 1, text=c[:1500]) for i, c in enumerate(chapters)]\n"
    "answers = llm_query_batched(prompts)\n"
    "print(len(answers), answers[:2])",
    "SUBMIT(richest=[{'chapter': i + 1, 'answer': a} for i, a in enumerate(answers)])",
]


def test_rlm_over_monte_cristo_batches_sub_calls_and_submits(stub_llm, chapters):
    result, script = run(stub_llm, chapters, BATCH_STEPS)
    assert result.richest == [{"chapter": n, "answer": f"richest-{n}"} for n in range(1, 118)]
    assert script.calls == [0, 1, 2]  # three root steps, in order
    assert len(sub_prompts(stub_llm)) == 117
    assert "117 Chapter 1" in result.trajectory[0]["output"]


def test_max_llm_calls_is_enforced_in_sandbox_code(stub_llm, chapters):
    steps = [
        "try:\n    llm_query_batched([f'richest in chapter {i}' for i in range(60)])\n"
        "except RuntimeError as e:\n    print('refused:', e)",
        "SUBMIT(richest=[{'one': llm_query('richest in chapter 1')}])",
    ]
    result, _ = run(stub_llm, chapters, steps, max_llm_calls=50)
    assert "refused: LLM call limit exceeded: 0 + 60 > 50" in result.trajectory[0]["output"]
    assert result.richest == [{"one": "richest-1"}]
    assert len(sub_prompts(stub_llm)) == 1  # the refused batch cost nothing


def test_dspy_facade_in_sandbox_code_runs_on_the_host_and_is_charged(stub_llm, chapters):
    steps = [
        "import dspy\nqa = dspy.Predict('question -> answer')\n"
        "print(qa(question='Where does chapter 1 take place?').answer)\n"
        "try:\n    qa(question='And chapter 2?')\nexcept Exception as e:\n    print('refused:', e)",
        "SUBMIT(richest=[])",
    ]
    result, _ = run(stub_llm, chapters, steps, max_llm_calls=1)
    first, refusal = result.trajectory[0]["output"].splitlines()
    assert first == "Marseilles"
    assert refusal.startswith("refused:") and "LLM call limit exceeded: 1 + 1 > 1" in refusal
    assert any("[[ ## question ## ]]" in r.prompt for r in stub_llm.requests)
