"""The bridge's wire protocol is a closed set built by one constructor per message type, and the
interpreter is what DSPy's ``CodeInterpreter`` Protocol says (no sandbox is started here)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from dspy.primitives.code_interpreter import CodeInterpreter

from broker_bridge import SandboxInterpreter, interpreter_factory
from broker_bridge.sandbox import protocol

BRIDGE = Path(__file__).resolve().parents[1] / "broker_bridge"

EVERY_MESSAGE = [
    protocol.call_message("c1", "tool", ("a",), {"k": 1}),
    protocol.value_result("c1", [1, 2]),
    protocol.error_result("c1", "ValueError", "bad"),
    protocol.outcome_message("e1", "result", "printed", value=3),
    protocol.outcome_message("e1", "error", "", error="Traceback ..."),
    protocol.pending_message("c1"),
    protocol.wake_message(),
]
VALIDATORS = {protocol.CALL: protocol.validate_call, protocol.RESULT: protocol.validate_result,
              protocol.OUTCOME: protocol.validate_outcome}


def test_every_message_type_has_a_constructor_and_survives_the_wire() -> None:
    assert {m["type"] for m in EVERY_MESSAGE} == set(protocol.MESSAGE_TYPES)
    for message in EVERY_MESSAGE:
        again: dict[str, Any] = protocol.loads(protocol.dumps(message))
        if message["type"] in VALIDATORS:
            assert VALIDATORS[message["type"]](again) == message
        assert again == message


@pytest.mark.parametrize("broken, complaint", [
    ({**protocol.call_message("c1", "tool", [], {}), "args": "x"}, "call needs 'args' of type list"),
    ({**protocol.error_result("c1", "E", "m"), "error": None}, "result needs 'error' of type str"),
    ({**protocol.outcome_message("e1", "final", ""), "kind": "escaped"}, "outcome kind must be one of"),
    (protocol.pending_message("c1"), "expected a message of type 'outcome'"),
])
def test_a_malformed_message_is_a_protocol_error(broken: dict, complaint: str) -> None:
    validate = VALIDATORS.get(broken["type"], protocol.validate_outcome)
    with pytest.raises(protocol.ProtocolError, match=complaint):
        validate(broken)


def test_an_outcome_of_an_unknown_kind_cannot_be_built() -> None:
    with pytest.raises(protocol.ProtocolError, match="outcome kind must be one of"):
        protocol.outcome_message("e1", "escaped", "")


def test_no_module_builds_a_message_by_hand() -> None:
    """Only protocol.py writes a dict literal with a "type" key: the others call its constructors."""
    by_hand = []
    for path in sorted(BRIDGE.rglob("*.py")):
        if path.name == "protocol.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "type" for k in node.keys):
                by_hand.append(f"{path.relative_to(BRIDGE.parent)}:{node.lineno}")
    assert by_hand == []


def test_the_interpreter_is_a_dspy_code_interpreter_and_the_factory_is_not() -> None:
    factory = interpreter_factory("local")
    interpreter = factory()  # nothing starts before the first execute
    try:
        assert isinstance(interpreter, SandboxInterpreter)
        assert isinstance(interpreter, CodeInterpreter)
        assert not isinstance(factory, CodeInterpreter)  # DSPy refuses a factory that is itself an interpreter
        assert interpreter.sandbox_id is None
    finally:
        interpreter.shutdown()
