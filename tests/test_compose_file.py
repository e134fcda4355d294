"""Deployment files: docker-compose.yml, Dockerfile, .dockerignore, .env.example.

docker-compose.yml is validated against the Compose Specification JSON schema vendored in
tests/data/compose-spec.json (origin: see tests/data/README.md — the schema embedded in
Docker Compose v2.40.3, i.e. compose-go v2.9.1's schema/compose-spec.json), then checked for
the properties the fleet relies on.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from rlmq.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "tests" / "data" / "compose-spec.json"
COMPOSE_PATH = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENV_EXAMPLE = REPO / ".env.example"

CELERY_SERVICES = ["rlm-worker", "llm-worker", "beat", "flower"]
RLMQ_SERVICES = [*CELERY_SERVICES, "exporter"]


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE_PATH.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _validator(schema: dict):
    # The vendored spec names draft-07 as "https://json-schema.org/draft-07/schema" (no trailing "#"), a URI
    # jsonschema does not know: without a default it warns and validates by the latest draft instead.
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def _errors(schema: dict, document: dict) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(_validator(schema).iter_errors(document), key=lambda e: list(map(str, e.path)))
    ]


def _command(service: dict) -> list[str]:
    cmd = service.get("command")
    assert cmd, "service has no command"
    return list(cmd) if isinstance(cmd, list) else shlex.split(cmd)


def _command_text(service: dict) -> str:
    return " ".join(_command(service))


def _duration_seconds(text: str) -> float:
    """Compose durations use Go syntax: 30m, 1h30m, 90s, 1m30s, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --------------------------------------------------------------------------- the schema


def test_vendored_schema_is_the_compose_specification(schema):
    assert schema["title"] == "Compose Specification"
    assert schema["$id"] == "compose_spec.json"
    for key in ("services", "volumes", "networks", "configs", "secrets"):
        assert key in schema["properties"]
    service = schema["definitions"]["service"]
    assert service["additionalProperties"] is False
    assert {"stop_grace_period", "healthcheck", "depends_on", "env_file"} <= set(service["properties"])


def test_compose_file_matches_the_compose_specification(schema, compose):
    errors = _errors(schema, compose)
    assert errors == [], "docker-compose.yml violates the Compose Specification:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda c: c["services"]["rlm-worker"].update(comand="typo"), "services/rlm-worker"),
        (lambda c: c["services"]["redis"]["healthcheck"].update(test=42), "services/redis/healthcheck/test"),
        (lambda c: c["services"]["llm-worker"].update(depends_on={"redis": {"condition": "healthy"}}),
         "services/llm-worker/depends_on"),
        (lambda c: c.update(volumez={}), "<root>"),
    ],
)
def test_schema_rejects_broken_variants(schema, compose, mutate, where):
    broken = json.loads(json.dumps(compose))
    mutate(broken)
    errors = _errors(schema, broken)
    assert any(e.startswith(where + ":") for e in errors), errors


DEPLOY_FILES = ["deploy/compose.workers.yml", "deploy/compose.redis-host.yml"]


def _load(path: str) -> dict:
    data = yaml.safe_load((REPO / path).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("path", DEPLOY_FILES)
def test_deploy_files_match_the_compose_specification_and_document_their_variables(schema, path):
    errors = _errors(schema, _load(path))
    assert errors == [], f"{path} violates the Compose Specification:\n" + "\n".join(errors)
    names = _env_example_names()
    for m in re.finditer(r"(?<!\$)\$\{(\w+)(:?[-?][^}]*)?\}", (REPO / path).read_text(encoding="utf-8")):
        assert m.group(1) in names, f"{path}: ${{{m.group(1)}}} should be documented in .env.example"


def test_worker_hosts_run_the_same_services_as_the_one_host_stack(compose):
    workers = _load("deploy/compose.workers.yml")
    for name in ("rlm-worker", "llm-worker", "flower"):
        mine, reference = workers["services"][name], compose["services"][name]
        for key in ("command", "security_opt", "stop_signal", "stop_grace_period", "healthcheck", "ports", "image"):
            assert mine.get(key) == reference.get(key), (name, key)
        # Redis is elsewhere: the URL is required, nothing waits for a local redis service.
        assert mine["environment"]["REDIS_URL"].startswith("${REDIS_URL:?"), mine["environment"]
        assert "depends_on" not in mine and mine["env_file"] == "../.env" and mine["build"]["context"] == ".."
    assert "redis" not in workers["services"] and workers["services"]["flower"]["profiles"] == ["flower"]


def test_redis_hosts_keep_passwords_off_command_lines_and_announce_the_hosts_address():
    services = _load("deploy/compose.redis-host.yml")["services"]
    for name in ("redis", "sentinel"):
        svc = services[name]
        assert svc["network_mode"] == "host" and svc["user"] == "redis"
        script = _command(svc)[-1]
        assert "--requirepass" not in script and "$$REDIS_PASSWORD" in script  # as config, from the environment
        assert svc["environment"]["REDIS_PASSWORD"] == "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}"
    assert "masterauth" in _command(services["redis"])[-1]  # any server may be a replica after a failover
    assert "[ -s sentinel.conf ] ||" in _command(services["sentinel"])[-1]  # the learned topology survives restarts


# --------------------------------------------------------------------------- services


def test_services_present(compose):
    assert set(compose["services"]) == {"redis", *RLMQ_SERVICES}


def test_redis_has_healthcheck_and_persistence(compose):
    redis = compose["services"]["redis"]
    assert re.fullmatch(r"redis:7(\.[\w.-]+)?(-[\w.-]+)?", redis["image"]), redis["image"]
    test = redis["healthcheck"]["test"]
    test_text = " ".join(test) if isinstance(test, list) else test
    assert "redis-cli" in test_text and "ping" in test_text
    command = [word for part in _command(redis) for word in shlex.split(part)]
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in redis["volumes"]]
    named = [m.split(":")[0] for m in mounts if m.split(":")[1] == "/data"]
    assert named and named[0] in (compose.get("volumes") or {}), "redis /data must be a named volume"


def test_redis_requires_the_password_from_env(compose):
    redis = compose["services"]["redis"]
    text = _command_text(redis)
    # requirepass from a container-time variable, fed on stdin: not on redis-server's command line
    assert "requirepass" in text and "$$REDIS_PASSWORD" in text and "redis-server -" in text
    assert "--requirepass" not in text
    env = redis["environment"]
    for name in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        assert env[name] == "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}", f"{name} must refuse an unset password"
    assert "REDIS_PASSWORD" in _env_example_names()
    assert redis.get("user") == "redis"  # sh -c bypasses the image's own privilege drop


@pytest.mark.parametrize("name", RLMQ_SERVICES)
def test_rlmq_services_share_one_built_image(compose, name):
    services = compose["services"]
    reference = services["rlm-worker"]
    svc = services[name]
    assert svc.get("image") and svc["image"] == reference["image"]
    assert svc.get("build") == reference["build"]
    build = svc["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (REPO / context / dockerfile).resolve() == DOCKERFILE


@pytest.mark.parametrize("name", RLMQ_SERVICES)
def test_rlmq_services_use_the_celery_app_and_env(compose, name):
    svc = compose["services"][name]
    if name in CELERY_SERVICES:
        assert re.search(r"(^|\s)celery -A tasks\s", _command_text(svc)), _command_text(svc)
    env_file = svc["env_file"]
    env_files = [env_file] if isinstance(env_file, str) else [e if isinstance(e, str) else e["path"] for e in env_file]
    assert ".env" in env_files
    env = svc["environment"]
    env = env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)
    assert env["REDIS_URL"] == "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}@redis:6379/0"
    depends = svc["depends_on"]
    assert isinstance(depends, dict) and depends["redis"]["condition"] == "service_healthy"


def test_exporter_serves_the_fleet_metrics(compose):
    svc = compose["services"]["exporter"]
    assert _command(svc)[:2] == ["rlmq", "exporter"]
    text = _command_text(svc)
    assert "--port 9808" in text and "--address 0.0.0.0" in text  # reachable from a Prometheus container
    assert any(str(p).endswith(":9808") for p in svc["ports"])


def test_no_service_pins_a_container_name(compose):
    for name, svc in compose["services"].items():
        assert "container_name" not in svc, f"{name} has container_name: breaks scaling and parallel stacks"


def test_rlm_worker(compose):
    svc = compose["services"]["rlm-worker"]
    cmd = _command(svc)
    text = " ".join(cmd)
    assert "worker" in cmd and "-Q rlm" in text and "llm" not in text.split("-Q ")[1].split()[0]
    # threads: the engine enforces RLMQ_RUN_TIME_LIMIT itself, and a run costs a thread, not a process
    assert "--pool threads" in text
    assert "--concurrency 32" in text and "--prefetch-multiplier 1" in text
    assert "-E" in cmd and "-n rlm@%h" in text
    assert _duration_seconds(svc["stop_grace_period"]) >= 600, "a deploy must not kill running RLM runs"
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"  # Celery's warm shutdown


def test_llm_worker_is_scalable(compose):
    svc = compose["services"]["llm-worker"]
    text = _command_text(svc)
    assert "worker" in text and "-Q llm" in text and "rlm" not in text.split("-Q ")[1].split()[0]
    assert "--pool threads" in text and "--concurrency 32" in text
    assert "container_name" not in svc
    assert "ports" not in svc, "fixed host ports would clash with --scale llm-worker=N"
    assert "hostname" not in svc
    assert "%h" in text  # one node name per replica


def test_beat(compose):
    text = _command_text(compose["services"]["beat"])
    assert "celery -A tasks beat" in text
    assert "deploy" not in compose["services"]["beat"]  # exactly one beat


def test_flower_basic_auth_comes_from_env(compose):
    svc = compose["services"]["flower"]
    text = _command_text(svc)
    assert "celery -A tasks flower" in text and "--port=5555" in text.replace("--port 5555", "--port=5555")
    match = re.search(r"--basic-auth[= ]\"?([^\s\"]+)", text)
    assert match, "flower must run with --basic-auth"
    # a container-time variable ($$ escapes compose interpolation), never a literal credential
    assert match.group(1) in ("$$FLOWER_BASIC_AUTH", "$${FLOWER_BASIC_AUTH}")
    assert ":?" in text, "flower should refuse to start when FLOWER_BASIC_AUTH is unset"
    targets = []
    for port in svc["ports"]:
        targets.append(str(port["target"]) if isinstance(port, dict) else str(port).rsplit(":", 1)[-1])
    assert targets == ["5555"]
    assert "FLOWER_BASIC_AUTH" in _env_example_names()


def test_compose_variables_are_documented_or_defaulted():
    text = COMPOSE_PATH.read_text(encoding="utf-8")
    names = _env_example_names()
    for m in re.finditer(r"(?<!\$)\$\{(\w+)(:?[-?][^}]*)?\}", text):
        assert m.group(2) or m.group(1) in names, f"${{{m.group(1)}}} is neither defaulted nor in .env.example"
        assert m.group(1) in names, f"${{{m.group(1)}}} should be documented in .env.example"


@pytest.mark.skipif(
    not (shutil.which("docker-compose") or shutil.which("docker")), reason="no docker compose binary on PATH"
)
def test_docker_compose_config_accepts_the_file(tmp_path):
    """Where Docker Compose v2 is installed, its own parser must accept the file too."""
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(candidate[0]):
            continue
        probe = subprocess.run([*candidate, "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 and re.search(r"v?2\.\d+", probe.stdout):
            break
    else:
        pytest.skip("no Docker Compose v2 (`docker compose` / `docker-compose`) available")
    for name in ("docker-compose.yml", "Dockerfile", ".dockerignore", ".env.example"):
        shutil.copy(REPO / name, tmp_path / name)
    env_text = (REPO / ".env.example").read_text(encoding="utf-8")
    (tmp_path / ".env").write_text(env_text.replace("\nREDIS_PASSWORD=\n", "\nREDIS_PASSWORD=compose-check\n"))
    proc = subprocess.run([*candidate, "config", "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    logical, current = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    out = []
    for inst in logical:
        keyword, _, args = inst.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def test_dockerfile_base_install_user_and_cmd():
    inst = _dockerfile_instructions()
    keywords = [k for k, _ in inst]
    assert keywords[0] in ("FROM", "ARG")
    froms = [a for k, a in inst if k == "FROM"]
    assert froms and froms[-1].split()[0] == "python:3.11-slim"
    runs = " ".join(a for k, a in inst if k == "RUN")
    assert re.search(r"pip install [\"']?\.\[demo\][\"']?", runs), "the image must `pip install .[demo]`"
    users = [a for k, a in inst if k == "USER"]
    assert users, "the image must switch to an unprivileged USER"
    final_user = users[-1].split(":")[0]
    assert final_user not in ("root", "0"), f"final USER is {users[-1]!r}"
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), "USER before the last RUN"
    cmd = [a for k, a in inst if k == "CMD"]
    assert cmd and json.loads(cmd[-1]) == ["rlmq", "--help"]


def test_dockerfile_bakes_in_no_secrets():
    for keyword, args in _dockerfile_instructions():
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args)
            for name in names:
                assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD|AUTH", name, re.I), f"{keyword} {name} in Dockerfile"
        if keyword in ("COPY", "ADD"):
            sources = args.split()[:-1]
            assert ".env" not in sources and "." not in sources, f"{keyword} {args}: copies secrets or the whole tree"


def test_dockerfile_copies_exist_and_cover_the_packages():
    import tomllib

    copied = []
    for keyword, args in _dockerfile_instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            copied += [s for s in args.split()[:-1] if not s.startswith("--")]
    for source in copied:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    readme = project["project"].get("readme")
    if isinstance(readme, str):
        assert readme in copied, f"pyproject's readme {readme} is needed by `pip install .`"
    for package in project["tool"]["setuptools"]["packages"]:
        top = package.split(".")[0]
        assert top in copied, f"package {package} is not copied into the image"


def test_dockerignore_keeps_secrets_out_and_sources_in():
    lines = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert ".env" in patterns and ".git" in patterns
    for needed in ("pyproject.toml", "README.md", "rlmq", "tasks", "workers", "broker_bridge"):
        assert needed not in patterns


# --------------------------------------------------------------------------- .env.example


def _env_example_entries() -> list[tuple[str, str, str]]:
    """(name, value, comment line above) for `NAME=value` and commented-out `# NAME=value`."""
    entries, previous = [], ""
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            entries.append((m.group(1), m.group(2), previous))
        previous = line.strip()
    return entries


def _env_example_names() -> set[str]:
    return {name for name, _, _ in _env_example_entries()}


def test_env_example_documents_every_setting_with_a_comment():
    entries = _env_example_entries()
    names = [n for n, _, _ in entries]
    assert len(names) == len(set(names)), "a setting appears twice"
    required = {"REDIS_URL", "RLMQ_LM", "RLMQ_SUB_LM", "RLMQ_LM_API_BASE", "RLMQ_SANDBOX", "DAYTONA_API_KEY",
                "OPENAI_API_KEY", "OPENROUTER_API_KEY", "FLOWER_BASIC_AUTH"}
    assert required <= set(names), required - set(names)
    for name, _, comment in entries:
        assert comment.startswith("#") and not re.fullmatch(r"#\s*[A-Z][A-Z0-9_]*=.*", comment), \
            f"{name} needs a one-line comment above it"
        assert len(comment) > 10


def test_env_example_covers_the_settings_the_code_reads():
    names = _env_example_names()
    for f in dataclasses.fields(Settings):
        assert f.metadata["env"] in names, f"{f.metadata['env']} (rlmq/settings.py) is not in .env.example"


def test_env_example_has_no_real_secrets():
    for name, value, _ in _env_example_entries():
        if re.search(r"KEY|SECRET|TOKEN|PASSWORD|AUTH", name):
            assert value == "", f"{name} must be left empty in .env.example"
        assert not re.search(r"(sk-|sk_|dtn_|xox.-)[A-Za-z0-9_-]{16,}", value), f"{name} looks like a real key"
