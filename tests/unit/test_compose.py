"""Static checks of the production-shaped deployment in `compose/`.

No docker here: the compose file, the Dockerfile and `.env.example` are parsed and
checked for the properties an operator relies on (pinned images, health checks,
persistent volumes, no default secrets, start-up order, commands that exist).
"""

from __future__ import annotations

import base64
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from yakpanel.cli import app
from yakpanel.services import SERVICE_FACTORIES, SERVICE_NEEDS
from yakpanel.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"

SECRET_MARKERS = ("PASSWORD", "SECRET", "MASTER_KEY", "CLUSTER_ID")
EMPTY_IN_EXAMPLE_MARKERS = ("PASSWORD", "SECRET", "MASTER_KEY")
ONE_SHOT_SERVICES = {"migrate"}
# Stateful services and the path in the container where each keeps its data.
DATA_DIRS = {
    "postgres": "/var/lib/postgresql/data",
    "clickhouse": "/var/lib/clickhouse",
    "kafka": "/var/lib/kafka/data",
}

# `$$` is an escaped dollar (no interpolation); `${NAME...}` and `$NAME` are references.
_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<modifier>[^}]*)\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def _compose_text() -> str:
    return COMPOSE_FILE.read_text()


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(_compose_text())
    assert isinstance(data, dict), f"{COMPOSE_FILE} is not a YAML mapping"
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose().get("services")
    assert isinstance(services, dict), f"{COMPOSE_FILE} has no `services` mapping"
    assert services, f"{COMPOSE_FILE} declares no services"
    return services


def _references(text: str) -> list[tuple[str, str | None]]:
    """(name, modifier) for every interpolation; modifier is None for the bare `$NAME` form."""
    refs: list[tuple[str, str | None]] = []
    for match in _INTERPOLATION.finditer(text):
        if match.group("braced"):
            refs.append((match.group("braced"), match.group("modifier")))
        elif match.group("bare"):
            refs.append((match.group("bare"), None))
    return refs


def _env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for number, raw in enumerate(ENV_EXAMPLE.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{ENV_EXAMPLE.name}:{number}: not NAME=value: {raw!r}"
        values[name.strip().removeprefix("export ").strip()] = value.strip()
    return values


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {name: value for name, _, value in pairs}
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _image_tag(image: str) -> str | None:
    reference = image.split("@", 1)[0]
    last = reference.rsplit("/", 1)[-1]
    if ":" not in last:
        return None
    return last.rsplit(":", 1)[1]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    if current:
        logical.append(current)
    out = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _cli_command_names() -> set[str]:
    names = set()
    for info in app.registered_commands:
        if info.name:
            names.add(info.name)
        elif info.callback is not None:
            names.add(info.callback.__name__.replace("_", "-"))
    return names


# --- images --------------------------------------------------------------------------


def test_every_service_image_has_a_pinned_tag() -> None:
    problems = []
    for name, service in _services().items():
        image = service.get("image")
        if not isinstance(image, str) or not image:
            problems.append(f"{name}: no `image` (a built image needs a name:tag too)")
            continue
        tag = _image_tag(image)
        if tag is None:
            problems.append(f"{name}: image {image!r} has no tag")
        elif tag == "latest":
            problems.append(f"{name}: image {image!r} uses the moving `latest` tag")
    assert not problems, "images must be pinned:\n" + "\n".join(problems)


def test_yakpanel_image_tag_matches_the_project_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    services = _services()
    built = {name: s["image"] for name, s in services.items() if "build" in s}
    assert {"migrate", "api"} <= built.keys(), f"migrate and api must build the image: {built}"
    for name, image in built.items():
        assert image == f"yakpanel:{version}", (
            f"{name}: built image is {image!r}, expected yakpanel:{version} (pyproject version)"
        )
        assert services[name]["build"].get("dockerfile") == "compose/Dockerfile", name


# --- health and start-up order ----------------------------------------------------------


def test_every_long_running_service_has_a_healthcheck() -> None:
    services = _services()
    long_running = sorted(set(services) - ONE_SHOT_SERVICES)
    assert long_running, "no long-running services found"
    problems = []
    for name in long_running:
        check = services[name].get("healthcheck")
        if not isinstance(check, dict):
            problems.append(f"{name}: no healthcheck")
        elif check.get("disable"):
            problems.append(f"{name}: healthcheck is disabled")
        elif not check.get("test"):
            problems.append(f"{name}: healthcheck has no `test`")
    assert not problems, "\n".join(problems)


def test_api_waits_for_migrations_and_backing_services() -> None:
    depends = _services()["api"].get("depends_on")
    assert isinstance(depends, dict), "api.depends_on must use the long form with conditions"
    assert depends.get("migrate", {}).get("condition") == "service_completed_successfully", (
        "api must start only after `migrate` exits successfully"
    )
    for backing in ("kafka", "postgres", "clickhouse"):
        assert depends.get(backing, {}).get("condition") == "service_healthy", (
            f"api must wait for {backing} to be healthy"
        )


def test_migrate_is_a_one_shot_job_after_its_databases() -> None:
    migrate = _services()["migrate"]
    assert migrate.get("command") == ["migrate"], migrate.get("command")
    assert migrate.get("restart") == "no", "a one-shot job must not be restarted"
    depends = migrate.get("depends_on")
    assert isinstance(depends, dict), "migrate.depends_on must use the long form"
    for backing in ("postgres", "clickhouse"):
        assert depends.get(backing, {}).get("condition") == "service_healthy", (
            f"migrate must wait for {backing} to be healthy"
        )


# --- persistent data --------------------------------------------------------------------


@pytest.mark.parametrize("service_name", sorted(DATA_DIRS))
def test_stateful_service_keeps_its_data_on_a_declared_named_volume(service_name: str) -> None:
    compose = _compose()
    declared = set((compose.get("volumes") or {}).keys())
    mounts = compose["services"][service_name].get("volumes") or []
    named: dict[str, str] = {}
    for mount in mounts:
        if isinstance(mount, str):
            source, _, rest = mount.partition(":")
            target = rest.split(":", 1)[0]
        else:
            source, target = mount.get("source", ""), mount.get("target", "")
        if source and not source.startswith(("/", ".", "~", "$")):
            named[target] = source
    want = DATA_DIRS[service_name]
    assert want in named, (
        f"{service_name} must mount a named volume at {want}; named mounts: {named}"
    )
    assert named[want] in declared, (
        f"{service_name}: volume {named[want]!r} is not declared in the top-level `volumes`"
    )


def test_kafka_writes_its_log_to_the_volume() -> None:
    env = _environment(_services()["kafka"])
    assert env.get("KAFKA_LOG_DIRS") == DATA_DIRS["kafka"], (
        "apache/kafka defaults log.dirs to /tmp; KAFKA_LOG_DIRS must point at the volume"
    )


# --- variables and secrets --------------------------------------------------------------


def test_compose_file_interpolates_variables() -> None:
    # Guards the two tests below against passing vacuously on a broken regex.
    names = {name for name, _ in _references(_compose_text())}
    assert {"POSTGRES_PASSWORD", "CLICKHOUSE_PASSWORD", "YAKPANEL_MASTER_KEY"} <= names, names


def test_secrets_are_only_referenced_as_required_variables() -> None:
    problems = []
    for name, modifier in _references(_compose_text()):
        if not any(marker in name for marker in SECRET_MARKERS):
            continue
        if modifier is None or not modifier.startswith(":?"):
            shown = f"${name}" if modifier is None else f"${{{name}{modifier}}}"
            problems.append(f"{shown}: a secret must be written ${{{name}:?message}}")
    assert not problems, (
        "compose must refuse to start without secrets (no defaults):\n" + "\n".join(problems)
    )


def test_every_interpolated_variable_is_in_env_example() -> None:
    referenced = {name for name, _ in _references(_compose_text())}
    missing = sorted(referenced - set(_env_example()))
    assert not missing, f"variables used by docker-compose.yml but not in .env.example: {missing}"


def test_env_example_leaves_secrets_empty() -> None:
    example = _env_example()
    secrets = {k: v for k, v in example.items() if any(m in k for m in EMPTY_IN_EXAMPLE_MARKERS)}
    assert secrets, ".env.example lists no secrets at all"
    filled = sorted(k for k, v in secrets.items() if v.strip("'\""))
    assert not filled, f".env.example must not give a value to secrets: {filled}"


def test_every_env_example_secret_says_how_to_generate_it() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    for index, raw in enumerate(lines):
        name = raw.partition("=")[0].strip()
        if "=" not in raw or raw.lstrip().startswith("#"):
            continue
        if not any(marker in name for marker in SECRET_MARKERS):
            continue
        comments = []
        for above in reversed(lines[:index]):
            if not above.lstrip().startswith("#"):
                break
            comments.append(above)
        assert any("generate" in c.lower() for c in comments), (
            f"{name}: the comment above it must say how to generate it"
        )


def test_yakpanel_environment_is_valid_production_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sample = {name: "x" for name, _ in _references(_compose_text())}
    sample["YAKPANEL_MASTER_KEY"] = base64.b64encode(bytes(range(32))).decode()
    sample["YAKPANEL_INTERNAL_TOKEN"] = "0123456789abcdef" * 4
    sample["CLICKHOUSE_DB"] = "yakpanel"

    def substitute(value: str) -> str:
        def one(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            return sample[match.group("braced") or match.group("bare")]

        return _INTERPOLATION.sub(one, value)

    fields = {f"YAKPANEL_{name.upper()}" for name in Settings.model_fields}
    for service_name in ("migrate", "api", "worker", "gateway", "aggregator"):
        env = _environment(_services()[service_name])
        unknown = sorted(k for k in env if k.startswith("YAKPANEL_") and k not in fields)
        assert not unknown, f"{service_name}: not YakPanel settings: {unknown}"
        for key in [k for k in os.environ if k.startswith("YAKPANEL_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, substitute(value))
        settings = Settings()
        assert settings.env == "production", service_name
        needs = SERVICE_NEEDS.get(service_name, frozenset({"postgres", "kafka", "clickhouse"}))
        assert settings.external_settings_missing(needs) == [], (
            f"{service_name} would fall back to the embedded stack"
        )


# --- commands ---------------------------------------------------------------------------


def test_api_command_names_a_known_service() -> None:
    command = _services()["api"].get("command")
    assert isinstance(command, list), f"api command must be an exec-form list: {command!r}"
    assert len(command) == 2, f"api command must be [serve, NAME]: {command!r}"
    assert command[0] == "serve", f"api command must be [serve, NAME]: {command!r}"
    assert "serve" in _cli_command_names(), "`yakpanel serve` does not exist"
    assert command[1] in SERVICE_FACTORIES, (
        f"api runs `serve {command[1]}`, but known services are {sorted(SERVICE_FACTORIES)}"
    )


def test_every_yakpanel_service_runs_in_its_own_container() -> None:
    served = {
        spec["command"][1]
        for spec in _services().values()
        if isinstance(spec.get("command"), list) and spec["command"][:1] == ["serve"]
    }
    assert served == set(SERVICE_FACTORIES), (
        f"compose runs `serve` for {sorted(served)}; the services are {sorted(SERVICE_FACTORIES)}"
    )


def test_migrate_is_a_cli_command() -> None:
    names = _cli_command_names()
    assert "migrate" in names, f"`yakpanel migrate` does not exist; commands: {sorted(names)}"


# --- Dockerfile -------------------------------------------------------------------------


def test_dockerfile_pins_its_base_images() -> None:
    stages: set[str] = set()
    bases = []
    for keyword, args in _dockerfile_instructions():
        if keyword != "FROM":
            continue
        words = [w for w in args.split() if not w.startswith("--")]
        image = words[0]
        if len(words) >= 3 and words[1].lower() == "as":
            stages.add(words[2].lower())
        if image.lower() in stages or image == "scratch":
            continue
        bases.append(image)
    assert bases, "the Dockerfile has no FROM"
    for image in bases:
        tag = _image_tag(image)
        assert tag is not None, f"base image {image!r} must pin a tag"
        assert tag != "latest", f"base image {image!r} uses the moving `latest` tag"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [args for keyword, args in _dockerfile_instructions() if keyword == "USER"]
    assert users, "the Dockerfile never switches USER, so the image runs as root"
    user = users[-1].split(":", 1)[0]
    assert user not in {"root", "0"}, f"the final USER is {users[-1]!r}"


def test_dockerfile_entrypoint_is_yakpanel_and_default_command_exists() -> None:
    instructions = dict(_dockerfile_instructions())
    assert json.loads(instructions["ENTRYPOINT"]) == ["yakpanel"], instructions["ENTRYPOINT"]
    command = json.loads(instructions["CMD"])
    assert command[0] in _cli_command_names(), f"default CMD {command} is not a CLI command"
    if command[0] == "serve":
        assert command[1] in SERVICE_FACTORIES, f"default CMD serves unknown {command[1]!r}"
    assert "HEALTHCHECK" in instructions, "the image has no HEALTHCHECK"


def test_dockerfile_installs_every_package_without_the_embedded_extra() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in includes}
    copied = set()
    installs = []
    for keyword, args in _dockerfile_instructions():
        if keyword == "COPY":
            copied.update(w.rstrip("/") for w in args.split()[:-1] if not w.startswith("--"))
        if keyword == "RUN" and "pip install" in args:
            installs.append(args)
    missing = sorted(packages - copied)
    assert not missing, f"packages the image would lack (not COPYed): {missing}"
    assert {"pyproject.toml", "README.md"} <= copied, "pyproject.toml and README.md are needed"
    assert installs, "the Dockerfile never pip-installs YakPanel"
    assert not any("embedded" in args for args in installs), (
        "production images install the base distribution, not the `embedded` extra"
    )
