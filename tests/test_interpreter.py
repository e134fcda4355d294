"""The interpreter's behaviour, the same tests on every backend: local, Daytona through the emulator, and
Daytona's cloud where a key is set."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading

import pytest
from dspy.primitives.code_interpreter import CodeExecutionError, CodeInterpreterError, FinalOutput

from broker_bridge import SandboxDied, SandboxTimeout, StoredInput
from tests.support.sandboxes import available_backends, make_factory


@pytest.fixture(params=available_backends())
def backend(request):
    if request.param == "daytona":
        request.getfixturevalue("daytona_env")  # the emulator stands in for Daytona's cloud
    return request.param


@pytest.fixture
def interp(backend, sandbox_pool):
    """A started sandbox of ``backend`` from the session's pool, its globals and tools reset after the test."""
    with sandbox_pool.lend(backend) as interpreter:
        yield interpreter


def test_state_persists_across_executes(interp):
    interp.execute("counter = 41\ndef bump():\n    global counter\n    counter += 1\n    return counter")
    interp.execute("import math\nbump()")
    assert interp.execute("print(counter, math.floor(2.5))") == "42 2"


JSON_VALUES = {
    "text": "héllo \"quoted\" \n newline",
    "integer": -12345678901234,
    "real": 3.25,
    "flag": True,
    "nothing": None,
    "items": [1, "two", [3.0], {"four": None}],
    "mapping": {"a": {"b": [True, False]}, "ü": ""},
}


def test_variables_of_every_json_type_arrive_intact(interp):
    printed = interp.execute("import json\nprint(json.dumps([text, integer, real, flag, nothing, items, mapping]))",
                             JSON_VALUES)
    assert json.loads(printed) == list(JSON_VALUES.values())
    types = interp.execute("print([type(v).__name__ for v in (text, integer, real, flag, nothing, items, mapping)])",
                           JSON_VALUES)
    assert types == "['str', 'int', 'float', 'bool', 'NoneType', 'list', 'dict']"


def test_large_values_arrive_intact_and_are_uploaded_once(interp):
    big_text = "".join(chr(97 + i % 26) for i in range(8 * 1024 * 1024))
    big_list = [f"chapter {i} " + "x" * 1000 for i in range(8000)]
    expected = (hashlib.sha256(big_text.encode()).hexdigest(),
                hashlib.sha256(json.dumps(big_list).encode()).hexdigest())
    code = ("import hashlib, json\n"
            "print(hashlib.sha256(big_text.encode()).hexdigest(), hashlib.sha256(json.dumps(big_list).encode()).hexdigest())")
    assert interp.execute(code, {"big_text": big_text, "big_list": big_list}).split() == list(expected)
    sent = interp.bytes_sent
    # The same values again are rebound from the sandbox's copy: only the small driver line travels.
    assert interp.execute(code, {"big_text": big_text, "big_list": big_list}).split() == list(expected)
    assert interp.bytes_sent - sent < 10_000
    # A mutation by code does not leak into the next execute's binding.
    interp.execute("big_list.clear()", {"big_text": big_text, "big_list": big_list})
    assert interp.execute("print(len(big_list))", {"big_text": big_text, "big_list": big_list}) == "8000"


def test_an_input_is_parsed_once_per_sandbox_and_each_execute_binds_its_own_copy(interp):
    documents = [{"id": n, "text": f"document {n} " + "y" * 100, "tags": ["a"]} for n in range(2000)]
    variables = {"documents": documents}
    parsed_before = int(interp.execute("print(__rlmq.inputs_parsed)"))
    interp.execute("kept = documents\ndocuments[0]['text'] = 'changed'\ndocuments[1]['tags'].append('b')\n"
                   "documents.append('extra')", variables)
    # The next execute sees the input as given, nested lists and dicts included, in a new object.
    out = interp.execute("print(len(documents), documents[0]['text'][:10], documents[1]['tags'], kept is documents)",
                         variables)
    assert out == "2000 document 0 ['a'] False"
    interp.execute("documents.clear()", variables)
    assert interp.execute("print(documents[-1]['id'])", variables) == "1999"
    # Four executes bound it; the sandbox parsed its file once.
    assert int(interp.execute("print(__rlmq.inputs_parsed)")) - parsed_before == 1


def test_a_stored_input_is_sent_as_its_stored_text_read_once():
    """A run's input blob goes into the sandbox as it is stored; the host does not encode the value again."""
    documents = [f"doc {n} " + "s" * 100 for n in range(2000)]
    text = json.dumps(documents, indent=1).encode()  # not the interpreter's own encoding: shows which one is sent
    digest, reads = hashlib.sha256(text).hexdigest(), []

    def read() -> bytes:
        reads.append(1)
        return text

    stored = StoredInput(documents, digest, len(text), read)
    interp = make_factory("local", stored_inputs=[stored])()
    try:
        for _ in range(3):
            assert interp.execute("print(len(documents), documents[5][:5])", {"documents": documents}) == "2000 doc 5"
        size = interp.execute(f"import os\nprint(os.path.getsize(os.path.join(__rlmq.runtime_dir, 'inputs', {digest!r})))")
        assert int(size) == len(text) and reads == [1]
    finally:
        interp.shutdown()


def test_syntax_error_is_a_syntax_error_and_the_session_survives(interp):
    interp.execute("kept = 'yes'")
    with pytest.raises(SyntaxError, match="line 2"):
        interp.execute("x = 1\ndef broken(:\n    pass")
    assert interp.execute("print(kept)") == "yes"


def test_runtime_error_is_a_code_execution_error_with_output_and_traceback(interp):
    with pytest.raises(CodeExecutionError) as info:
        interp.execute("print('before')\nvalues = {}\nvalues['missing']")
    message = str(info.value)
    assert "before" in message and "KeyError: 'missing'" in message and "line 3" in message
    assert interp.execute("print('alive')") == "alive"


@pytest.mark.parametrize("statement", ["raise SystemExit(3)", "raise KeyboardInterrupt", "import sys\nsys.exit('bye')"])
def test_system_exit_and_keyboard_interrupt_from_code_are_recoverable(interp, statement):
    interp.execute("kept = 7")
    with pytest.raises(CodeExecutionError, match=r"SystemExit|KeyboardInterrupt"):
        interp.execute(statement)
    assert interp.execute("print(kept)") == "7"


def test_typed_submit_positional_keyword_and_wrong_arity(interp):
    interp.output_fields = [{"name": "answer", "type": "str"}, {"name": "score", "type": "int"}]
    assert interp.execute("SUBMIT('yes', 3)") == FinalOutput({"answer": "yes", "score": 3})
    assert interp.execute("SUBMIT(score=4, answer='no')") == FinalOutput({"answer": "no", "score": 4})
    with pytest.raises(CodeExecutionError, match=r"SUBMIT takes 2 value\(s\) \(answer, score\) but 1 were given"):
        interp.execute("SUBMIT('only one')")
    with pytest.raises(CodeExecutionError, match="missing \\['score'\\]"):
        interp.execute("SUBMIT(answer='x')")


def test_submit_is_not_swallowed_by_except_exception(interp):
    interp.output_fields = [{"name": "answer"}]
    code = "try:\n    SUBMIT(answer='done')\nexcept Exception:\n    print('swallowed')"
    assert interp.execute(code) == FinalOutput({"answer": "done"})


def test_tools_added_after_construction_and_argument_styles(interp):
    interp.execute("x = 1")  # the session is running before the tools exist
    interp.tools["greet"] = lambda name, punctuation="!": f"hello {name}{punctuation}"

    def describe(a, b=2, *, c=3):
        return {"a": a, "b": b, "c": c}

    interp.tools["describe"] = describe
    out = interp.execute("print(greet('ann'), greet(name='bo', punctuation='?'))\n"
                         "print(describe(1), describe(1, 5), describe(a=1, c=9))")
    assert out == "hello ann! hello bo?\n{'a': 1, 'b': 2, 'c': 3} {'a': 1, 'b': 5, 'c': 3} {'a': 1, 'b': 2, 'c': 9}"
    with pytest.raises(CodeExecutionError, match="TypeError"):
        interp.execute("describe(1, 2, 3)")


def test_tool_return_types_and_async_tools(interp):
    async def slow_double(n):
        await asyncio.sleep(0.01)
        return n * 2

    interp.tools.update(
        as_list=lambda: [1, "a", None], as_dict=lambda: {"k": [1.5]}, as_int=lambda: 7, as_none=lambda: None,
        slow_double=slow_double,
    )
    out = interp.execute("print(repr(as_list()), repr(as_dict()), repr(as_int()), repr(as_none()), slow_double(n=21))")
    assert out == "[1, 'a', None] {'k': [1.5]} 7 None 42"


def test_tool_errors_are_catchable_with_the_original_message(interp):
    def fail(kind):
        if kind == "value":
            raise ValueError("bad value from the host")
        raise LookupError("custom lookup")

    class WeirdError(Exception):
        pass

    def weird():
        raise WeirdError("weird host failure")

    interp.tools.update(fail=fail, weird=weird, unserializable=lambda: {1, 2})
    out = interp.execute(
        "try:\n    fail('value')\nexcept ValueError as e:\n    print('caught', e)\n"
        "try:\n    fail('lookup')\nexcept LookupError as e:\n    print('caught', e)\n"
        "try:\n    weird()\nexcept RuntimeError as e:\n    print('caught', e)\n"
        "try:\n    unserializable()\nexcept TypeError as e:\n    print('caught', 'cannot cross into the sandbox' in str(e))"
    )
    assert out.splitlines() == [
        "caught bad value from the host", "caught custom lookup", "caught WeirdError: weird host failure", "caught True",
    ]


def test_calls_from_many_sandbox_threads_all_progress(interp):
    # The barrier only opens when all 16 calls are on the host at once: no concurrency, no pass.
    barrier = threading.Barrier(16, timeout=20)

    def meet(i):
        barrier.wait()
        return i * i

    interp.tools["meet"] = meet
    out = interp.execute(
        "from concurrent.futures import ThreadPoolExecutor\n"
        "with ThreadPoolExecutor(16) as pool:\n    print(sorted(pool.map(meet, range(16))))"
    )
    assert out == str(sorted(i * i for i in range(16)))


def test_shutdown_ends_the_session(backend):
    interp = make_factory(backend)()  # its own: the pool's sandboxes outlive the test
    interp.execute("x = 1")
    interp.shutdown()
    with pytest.raises(CodeInterpreterError, match="shut down"):
        interp.execute("print(x)")
    interp.shutdown()  # idempotent


@pytest.mark.slow  # waits out a timeout: not for the fast lane
def test_hung_execute_times_out_and_the_interpreter_reports_itself_dead(backend):
    interpreter = make_factory(backend, execution_timeout=2)()
    try:
        interpreter.execute("state = 'will be lost'")
        with pytest.raises(SandboxTimeout, match="2s"):
            interpreter.execute("while True:\n    pass")
        with pytest.raises(SandboxDied, match="cannot be used again"):
            interpreter.execute("print(state)")
    finally:
        interpreter.shutdown()


def test_output_is_capped_and_the_cap_is_stated(interp):
    out = interp.execute("print('a' * 50_000)\nfor i in range(100_000):\n    print(i)")
    assert "output capped" in out and "characters not shown" in out
    assert max(len(line) for line in out.splitlines()) <= 10_001
    assert len(out) < 101_000


def test_the_pooled_sandbox_forgets_the_previous_tests_names_and_tools(sandbox_pool):
    backend = "local"  # only local sandboxes are pooled (see SandboxPool.lend)
    with sandbox_pool.lend(backend) as first:
        first.tools["ping"] = lambda: "pong"
        first.output_fields = [{"name": "answer"}]
        first.execute("import json\nleft_over = ping()\ndef helper():\n    return 1")
    with sandbox_pool.lend(backend) as second:
        assert second is first and not second.tools and second.output_fields is None
        assert second.execute("print(sorted(n for n in ('left_over', 'helper', 'ping', 'json') if n in globals()))") \
            == "[]"
        assert second.execute("SUBMIT('one value')") == FinalOutput({"output": "one value"})
