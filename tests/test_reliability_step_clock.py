"""A step's code timeout counts the step's own time: time the code spends blocked on a host tool
(``llm_query_batched`` waiting on the fleet) does not trip it, time spent computing does."""

from __future__ import annotations

import time

import pytest

from broker_bridge import SandboxTimeout
from tests.support.sandboxes import assert_local_sandbox_gone, make_factory

pytestmark = pytest.mark.slow  # each waits out a step's timeout: not for the fast lane


def slow_tool(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


def test_waiting_on_a_host_tool_does_not_count() -> None:
    interp = make_factory("local", execution_timeout=1.5, tool_wait_limit=30)()
    interp.tools["slow_tool"] = slow_tool
    try:
        out = interp.execute("print([slow_tool(seconds=1.0) for _ in range(3)])")  # 3 s blocked on the host
        assert out == "['done', 'done', 'done']"
    finally:
        interp.shutdown()


def test_own_time_still_times_out_and_kills_the_sandbox() -> None:
    interp = make_factory("local", execution_timeout=1.5, tool_wait_limit=30)()
    interp.tools["slow_tool"] = slow_tool
    try:
        interp.start()
        sandbox_id, runtime_dir = interp.sandbox_id, interp.runtime_dir
        started = time.monotonic()
        with pytest.raises(SandboxTimeout, match=r"1\.5s limit"):
            # 1 s waiting on the tool (not counted), then a busy loop that runs past 1.5 s of own time
            interp.execute("slow_tool(seconds=1.0)\nimport time\nt = time.time()\nwhile time.time() - t < 30:\n    pass")
        assert 2.3 < time.monotonic() - started < 10
        assert_local_sandbox_gone(sandbox_id, runtime_dir)
    finally:
        interp.shutdown()


def test_without_a_tool_wait_limit_the_backend_times_out_on_wall_time() -> None:
    interp = make_factory("local", execution_timeout=1.5)()
    interp.tools["slow_tool"] = slow_tool
    try:
        with pytest.raises(SandboxTimeout):
            interp.execute("slow_tool(seconds=3.0)")
    finally:
        interp.shutdown()
