"""The operator pins, the submitter asks: run options checked against the workers' allow-lists."""

from __future__ import annotations

import pytest

from rlmq.client import Client, ClientError
from rlmq.run_options import OptionRefused, check_tools, with_options
from rlmq.settings import RUN_OPTIONS, SandboxBackend, Settings, SettingsError

BASE = Settings(redis_url="redis://127.0.0.1:1/0", lm="openai/root", sub_lm="openai/sub",
                lm_api_base="http://127.0.0.1:9/v1")


@pytest.mark.parametrize("options, refused", [
    ({"lm_api_base": "http://evil.example/v1"}, "lm_api_base='http://evil.example/v1' is not an endpoint"),
    ({"lm": "anthropic/claude"}, "lm='anthropic/claude' is not allowed"),
    ({"sub_lm": "openrouter/x/y"}, "sub_lm='openrouter/x/y' is not allowed"),
    ({"sandbox": "daytona"}, "sandbox='daytona' is not allowed"),
    ({"max_iters": 21}, "max_iters=21 is above this fleet's maximum 20"),
    ({"max_llm_calls": 501}, "max_llm_calls=501 is above"),
    ({"lm_timeout": 500}, "lm_timeout=500 is above"),
])
def test_by_default_a_run_may_only_ask_for_what_the_worker_is_configured_with(options, refused) -> None:
    with pytest.raises(OptionRefused, match=r"^rlmq run options refused by the workers' settings: ") as info:
        with_options(BASE, options)
    assert refused in str(info.value) and "\n" not in str(info.value)


def test_what_the_worker_is_configured_with_and_lower_limits_are_allowed() -> None:
    run = with_options(BASE, {"lm": "openai/sub", "sub_lm": "openai/root", "lm_api_base": "http://127.0.0.1:9/v1/",
                             "sandbox": "local", "max_iters": 3, "max_llm_calls": 500})
    assert (run.lm, run.sub_lm, run.max_iters) == ("openai/sub", "openai/root", 3)
    assert with_options(BASE, {"lm": None}).lm == "openai/root"  # None: not asked, the worker's value stands


def test_allow_lists_and_maxima_from_the_environment() -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:1/0", "RLMQ_LM": "openai/root", "RLMQ_LM_API_BASE": "http://a:1/v1",
           "RLMQ_ALLOWED_MODELS": "openai/*, anthropic/claude-3-5-*", "DAYTONA_API_KEY": "k",
           "RLMQ_ALLOWED_API_BASES": "http://a:1/v1,https://b.example/v1", "RLMQ_ALLOWED_SANDBOXES": "local,daytona",
           "RLMQ_RUN_MAXIMA": "max_iters=50,max_llm_calls=2000"}
    base = Settings.from_env(env)
    run = with_options(base, {"lm": "anthropic/claude-3-5-haiku", "sub_lm": "openai/gpt-4o", "max_iters": 50,
                             "lm_api_base": "https://b.example/v1", "sandbox": "daytona", "max_llm_calls": 2000})
    assert run.sandbox is SandboxBackend.DAYTONA and run.max_iters == 50
    assert base.max_iters == 20  # the default stays; the maximum is above it
    for options in ({"lm": "anthropic/claude-3-opus"}, {"max_iters": 51}, {"lm_api_base": "https://c.example/v1"}):
        with pytest.raises(OptionRefused):
            with_options(base, options)


@pytest.mark.parametrize("env, problem", [
    ({"RLMQ_RUN_MAXIMA": "rate_limit_rps=5"}, "RLMQ_RUN_MAXIMA='rate_limit_rps=5' must be name=number pairs"),
    ({"RLMQ_ALLOWED_API_BASES": "ftp://x"}, "RLMQ_ALLOWED_API_BASES='ftp://x' must be a URL"),
    ({"RLMQ_ALLOWED_SANDBOXES": "docker"}, "RLMQ_ALLOWED_SANDBOXES='docker' must be one of"),
    ({"RLMQ_ALLOWED_MODELS": " , "}, "RLMQ_ALLOWED_MODELS=' , ' must list at least one value"),
    ({"RLMQ_RUN_MAXIMA": "max_iters=10"}, "RLMQ_RUN_MAXIMA: max_iters=10 is below the configured max_iters (20)"),
])
def test_bad_pins_are_one_line_setting_errors(env, problem) -> None:
    with pytest.raises(SettingsError, match=r"^rlmq settings: ") as info:
        Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1/0", "RLMQ_LM": "openai/x", **env})
    assert problem in str(info.value)


@pytest.mark.parametrize("name", ["rate_limit_rps", "rate_limit_burst", "tokens_per_minute", "cache_ttl_seconds",
                                  "allowed_models", "allowed_api_bases", "allowed_sandboxes", "run_maxima"])
def test_fleet_wide_settings_are_operator_only(name) -> None:
    assert name not in RUN_OPTIONS
    with pytest.raises(SettingsError, match=f"unknown run option '{name}'"):
        with_options(BASE, {name: "5"})


def test_the_client_refuses_at_submit_only_when_configured_like_a_worker(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    for name in ("RLMQ_LM", "RLMQ_SUB_LM", "RLMQ_LM_API_BASE", "OPENAI_API_KEY", "ANTHROPIC_API_KEY",
                 "OPENROUTER_API_KEY", "DAYTONA_API_KEY", "RLMQ_SANDBOX"):
        monkeypatch.delenv(name, raising=False)
    client = Client("redis://127.0.0.1:1/0")  # unreachable: a refusal happens before Redis is used
    # Not configured: it cannot know the workers' pins, so only the form is checked (then Redis is needed).
    with pytest.raises(ClientError, match="cannot reach Redis"):
        client.submit("a -> b", {"a": "x"}, lm_api_base="http://elsewhere.example/v1")
    with pytest.raises(ClientError, match="lm_api_base='nope' must be a URL"):
        client.submit("a -> b", {"a": "x"}, lm_api_base="nope")
    # Configured like a worker (same .env / environment): refused at once, saying whose settings.
    monkeypatch.setenv("RLMQ_LM", "openai/root")
    monkeypatch.setenv("RLMQ_LM_API_BASE", "http://127.0.0.1:9/v1")
    with pytest.raises(ClientError, match=r"refused by this machine's rlmq settings .*http://elsewhere\.example/v1"):
        client.submit("a -> b", {"a": "x"}, lm_api_base="http://elsewhere.example/v1")
    with pytest.raises(ClientError, match="max_iters=99 is above"):
        client.submit("a -> b", {"a": "x"}, max_iters=99)


def test_user_tools_are_refused_unless_the_operator_lists_them() -> None:
    with pytest.raises(OptionRefused, match=r"tools refused by the workers' settings: os:system \(RLMQ_ALLOWED_TOOLS: none\)"):
        check_tools(BASE, ["os:system"])
    check_tools(BASE, [])
    pinned = Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1/0", "RLMQ_LM": "openai/x",
                                "RLMQ_ALLOWED_TOOLS": "mytools.*:*,json:dumps"})
    check_tools(pinned, ["mytools.geo:lookup", "json:dumps"])
    for path in ("os:system", "builtins:eval", "json:loads"):
        with pytest.raises(OptionRefused, match=path):
            check_tools(pinned, ["json:dumps", path])


def test_the_client_refuses_a_tool_at_submit_when_configured_like_a_worker(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLMQ_LM", "openai/root")
    monkeypatch.delenv("RLMQ_ALLOWED_TOOLS", raising=False)
    monkeypatch.delenv("RLMQ_SANDBOX", raising=False)
    monkeypatch.delenv("DAYTONA_API_KEY", raising=False)
    with pytest.raises(ClientError, match=r"tools refused by this machine's rlmq settings .*os:system"):
        Client("redis://127.0.0.1:1/0").submit("a -> b", {"a": "x"}, tools=["os:system"])
