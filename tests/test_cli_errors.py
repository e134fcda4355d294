"""Bad input to the ``rlmq`` command: a one-line error, a non-zero exit code, never a traceback."""

from __future__ import annotations

import pytest

from tests.support.cli import cli_env, rlmq

SIGNATURE = "chapters: list[str], task: str -> answer: str"


@pytest.fixture
def env(tmp_path, redis_url):
    return cli_env(tmp_path, REDIS_URL=redis_url)


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(("rlmq: error:", "usage:", "rlmq ")), result.stderr
    error = lines[-1]
    for fragment in fragments:
        assert fragment in error, (fragment, error)


def test_every_subcommand_has_help(env, tmp_path):
    for command in ("submit", "status", "watch", "result", "cancel", "list", "worker", "flower", "up", "demo"):
        result = rlmq(command, "--help", env=env, cwd=tmp_path)
        assert result.code == 0 and "usage: rlmq " + command in result.stdout, command


def test_unknown_subcommand_and_option(env, tmp_path):
    assert_one_line_error(rlmq("frobnicate", env=env, cwd=tmp_path), 2, "invalid choice: 'frobnicate'")
    assert_one_line_error(rlmq("list", "--colour", env=env, cwd=tmp_path), 2, "unrecognized arguments: --colour")


def test_missing_unreadable_binary_and_empty_inputs(env, tmp_path):
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


def test_bad_signature_and_input_names(env, tmp_path):
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


def test_unknown_run_id(env, tmp_path):
    for command in ("status", "result", "cancel", "watch"):
        assert_one_line_error(rlmq(command, "no-such-run", env=env, cwd=tmp_path), 4, "no run with id 'no-such-run'")


def test_redis_unreachable_and_unconfigured(tmp_path):
    down = cli_env(tmp_path, REDIS_URL="redis://127.0.0.1:1/0")
    assert_one_line_error(rlmq("list", env=down, cwd=tmp_path), 3, "cannot reach Redis at redis://127.0.0.1:1/0")
    nowhere = cli_env(tmp_path)
    assert_one_line_error(rlmq("status", "x", env=nowhere, cwd=tmp_path), 3, "REDIS_URL", "rlmq up")
