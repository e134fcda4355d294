"""Bad input to the ``rlmq`` command: a one-line error, a non-zero exit code, never a traceback.

Each case runs the command in a process of its own, forked from the session's forkserver
(``rlmq_forked``); one test runs the real ``python -m rlmq.cli`` to hold the two to the same answers.
"""

from __future__ import annotations

import functools

import pytest

from tests.support.cli import cli_env, rlmq_forked
from tests.support.cli import rlmq as rlmq_subprocess

SIGNATURE = "chapters: list[str], task: str -> answer: str"


@pytest.fixture
def env(tmp_path, redis_url):
    return cli_env(tmp_path, REDIS_URL=redis_url)


@pytest.fixture
def rlmq(mp_context):
    return functools.partial(rlmq_forked, mp_context)


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(("rlmq: error:", "usage:", "rlmq ")), result.stderr
    error = lines[-1]
    for fragment in fragments:
        assert fragment in error, (fragment, error)


def test_every_subcommand_has_help(env, tmp_path, rlmq):
    for command in ("submit", "status", "watch", "result", "cancel", "list", "worker", "flower", "up", "demo"):
        result = rlmq(command, "--help", env=env, cwd=tmp_path)
        assert result.code == 0 and "usage: rlmq " + command in result.stdout, command


def test_unknown_subcommand_and_option(env, tmp_path, rlmq):
    for run in (rlmq, rlmq_subprocess):  # forked as the other cases, and the real command: the same answers
        assert_one_line_error(run("frobnicate", env=env, cwd=tmp_path), 2, "invalid choice: 'frobnicate'")
        assert_one_line_error(run("list", "--colour", env=env, cwd=tmp_path), 2, "unrecognized arguments: --colour")
        assert_one_line_error(run("status", "no-such-run", env=env, cwd=tmp_path), 4, "no run with id 'no-such-run'")


def test_missing_unreadable_binary_and_empty_inputs(env, tmp_path, rlmq):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\xff\xfe" * 100)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (f"chapters=@{tmp_path / 'nope.txt'}", "nope.txt"),
        (f"chapters=@{binary}", "blob.txt"),
        (f"chapters=@{empty}", "empty"),
    ]
    for value, fragment in cases:
        result = rlmq("submit", "--signature", SIGNATURE, "--input", value, "--input", "task=x", env=env, cwd=tmp_path)
        assert_one_line_error(result, 2, fragment)


def test_bad_signature_and_input_names(env, tmp_path, rlmq):
    book = tmp_path / "book.txt"
    book.write_text("Some text.")
    result = rlmq("submit", "--signature", "chapters -> -> x", "--input", f"chapters=@{book}", env=env, cwd=tmp_path)
    assert_one_line_error(result, 2, "does not parse")
    result = rlmq("submit", "--signature", SIGNATURE, "--input", f"chapters=@{book}", "--input", "task=x",
                  "--input", "colour=red", env=env, cwd=tmp_path)
    assert_one_line_error(result, 2, "colour", "not in the signature")
    result = rlmq("submit", "--signature", SIGNATURE, "--input", f"chapters=@{book}", env=env, cwd=tmp_path)
    assert_one_line_error(result, 2, "missing input", "task")
    result = rlmq("submit", "--signature", SIGNATURE, "--input", "not an assignment", env=env, cwd=tmp_path)
    assert_one_line_error(result, 2)


def test_unknown_run_id(env, tmp_path, rlmq):
    for command in ("status", "result", "cancel", "watch"):
        assert_one_line_error(rlmq(command, "no-such-run", env=env, cwd=tmp_path), 4, "no run with id 'no-such-run'")


def test_redis_unreachable_and_unconfigured(tmp_path, rlmq):
    down = cli_env(tmp_path, REDIS_URL="redis://127.0.0.1:1/0")
    assert_one_line_error(rlmq("list", env=down, cwd=tmp_path), 3, "cannot reach Redis at redis://127.0.0.1:1/0")
    nowhere = cli_env(tmp_path)
    assert_one_line_error(rlmq("status", "x", env=nowhere, cwd=tmp_path), 3, "REDIS_URL", "rlmq up")


def test_a_missing_or_wrong_redis_password(tmp_path, rlmq, redis_server):
    """Every command that reads Redis, a job command too, says the password was refused (was a traceback)."""
    for url in (f"redis://127.0.0.1:{redis_server.port}/0", f"redis://:wrong@127.0.0.1:{redis_server.port}/0"):
        env = cli_env(tmp_path, REDIS_URL=url)
        for command in (("list",), ("status", "r1"), ("job", "list"), ("job", "status", "job1")):
            assert_one_line_error(rlmq(*command, env=env, cwd=tmp_path), 3, "refused the password",
                                  "redis://:PASSWORD@host:port")


LONG = "x" * 10_000
# (arguments, exit code, a fragment of the one-line error): every argument of every subcommand,
# empty, oversized, odd characters and the wrong type.
BAD_ARGUMENTS = [
    *[((command, run), 2, "is not a run id") for command in ("status", "watch", "result", "cancel")
      for run in ("", LONG, "a:b", "two words", "ünïcode", "$(touch /tmp/x)", "../../etc")],
    (("watch", "r1", "--timeout", "-1"), 2, "out of range"),
    (("watch", "r1", "--timeout", "nan"), 2, "out of range"),
    (("watch", "r1", "--timeout", "soon"), 2, "is not a number of seconds"),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--wait", "--timeout", "0"), 2, "out of range"),
    (("cancel", "r1", "--wait", "-1"), 2, "out of range"),
    (("cancel", "r1", "--wait", "x"), 2, "is not a number"),
    (("list", "--limit", "0"), 2, "out of range"),
    (("list", "--limit", "-3"), 2, "out of range"),
    (("list", "--limit", "ten"), 2, "is not a whole number"),
    (("list", "--limit", "9" * 40), 2, "out of range"),
    (("status", "r1", "--json", "extra"), 2, "unrecognized arguments"),
    (("result", "r1", "-o"), 2, "expected one argument"),
    (("submit",), 2, "--signature"),
    (("submit", "--signature", "", "--input", "a=1"), 2, "does not parse"),
    (("submit", "--signature", LONG, "--input", "a=1"), 2, "does not parse"),
    (("submit", "--signature", "a b -> c", "--input", "a=1"), 2, "is not a field name"),
    (("submit", "--signature", "a ->", "--input", "a=1"), 2, "has no outputs"),
    (("submit", "--signature", "a, a -> b", "--input", "a=1"), 2, "more than once"),
    (("submit", "--signature", "a -> b", "--input", "a="), 2, "empty"),
    (("submit", "--signature", "a -> b", "--input", "=1"), 2, ""),
    (("submit", "--signature", "a -> b", "--input", "ä-b=1"), 2, ""),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--max-iters", "0"), 2, "out of range"),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--max-iters", "1e3"), 2, "is not a whole number"),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--max-llm-calls", "-5"), 2, "out of range"),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--lm", ""), 2, "LiteLLM model string"),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--lm", "two words"), 2, "LiteLLM model string"),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--sub-lm", LONG + " x"), 2, "LiteLLM model string"),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--api-base", "not-a-url"), 2, "must be a URL"),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--api-base", ""), 2, "must be a URL"),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--sandbox", "vm"), 2, "invalid choice"),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--tool", "nocolon"), 2, "package.module:function"),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--tool", ""), 2, "package.module:function"),
    (("submit", "--signature", "a -> b", "--input", "a=1", "--tool", "a b:c"), 2, "package.module:function"),
    (("submit", "--signature", "a -> b", "--input", "a=@missing.txt", "--split", "["), 2, ""),
    (("worker", "both"), 2, "invalid choice"),
    (("worker", "rlm", "-c", "0"), 2, "out of range"),
    (("flower", "--port", "0"), 2, "out of range"),
    (("flower", "--port", "70000"), 2, "out of range"),
    (("flower", "--port", "http"), 2, "is not a TCP port"),
    (("up", "--flower-port", "-1"), 2, "out of range"),
    (("up", "--rlm-concurrency", "0"), 2, "out of range"),
    (("up", "--llm-concurrency", "many"), 2, "is not a whole number"),
    (("demo", "war-and-peace"), 2, "invalid choice"),
    (("demo", "monte-cristo", "--max-iters", "0"), 2, "out of range"),
    (("demo", "monte-cristo", "--timeout", "-1"), 2, "out of range"),
    (("demo", "monte-cristo", "--sandbox", ""), 2, "invalid choice"),
    (("--redis-url", "not-a-url", "list"), 2, "--redis-url"),
    (("--redis-url", "", "list"), 2, "--redis-url"),
    (("--redis-url", "redis://127.0.0.1:notaport/0", "list"), 2, "--redis-url"),
]


@pytest.mark.parametrize("arguments, code, fragment", BAD_ARGUMENTS,
                         ids=[" ".join(a)[:60] for a, _, _ in BAD_ARGUMENTS])
def test_every_bad_argument_gets_a_one_line_error(arguments, code, fragment, env, tmp_path, rlmq):
    assert_one_line_error(rlmq(*arguments, env=env, cwd=tmp_path), code, fragment)
