"""docker-compose.yml, the Dockerfile and the compose Envoy config: checked without Docker."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyOptions

from extproc.config import KNOWN_KEYS, PREFIX
from extproc.devtools.envoyconf import EnvoyOptions, render
from tests.deploy.manifests import ENVOY_IMAGE, ROOT, endpoint, envoy_validate, named

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_ENVOY = ROOT / "deploy" / "compose" / "envoy.yaml"
DOCKERFILE = ROOT / "Dockerfile"
# What deploy/compose/envoy.yaml is rendered from (its header says how).
COMPOSE_ENVOY_OPTIONS = EnvoyOptions(upstream_url="http://upstream:8000")
ONE_SHOT = {"migrate", "enable-model"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def test_compose_file_follows_the_compose_spec() -> None:
    parsed = PyOptions(apply_merge=True).from_yaml(COMPOSE.read_text(encoding="utf-8"))
    parsed.validate()
    assert set(parsed.service_names()) == {
        "postgres",
        "migrate",
        "enable-model",
        "upstream",
        "extproc",
        "envoy",
    }


def test_dependencies_exist_and_wait_for_health(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, rule in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            wanted = "service_completed_successfully" if target in ONE_SHOT else "service_healthy"
            assert rule["condition"] == wanted, f"{name} -> {target}"
        mode = service.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.removeprefix("service:") in service["depends_on"]


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
        else:
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


@pytest.mark.parametrize(
    ("service", "image"),
    [
        pytest.param("postgres", "postgres:18", id="postgres"),
        pytest.param("envoy", ENVOY_IMAGE, id="envoy"),
    ],
)
def test_images_are_pinned(services: dict[str, dict[str, Any]], service: str, image: str) -> None:
    assert services[service]["image"] == image


def test_own_image_is_built_and_tagged(services: dict[str, dict[str, Any]]) -> None:
    built = [s for s in services.values() if "build" in s]
    assert {s["image"] for s in built} == {"extproc:0.1.0-demo"}
    assert all(not s["image"].endswith(":latest") for s in services.values())
    assert {s["build"]["target"] for s in built} <= dockerfile_stages()


def test_environment_names_are_known_settings(services: dict[str, dict[str, Any]]) -> None:
    known = {PREFIX + key for key in KNOWN_KEYS}
    for name, service in services.items():
        for variable in service.get("environment", {}):
            if variable.startswith(PREFIX):
                assert variable in known, f"{name}: {variable} is not a setting"


def test_envoy_config_is_the_rendered_one() -> None:
    text = COMPOSE_ENVOY.read_text(encoding="utf-8")
    body = text[text.index("\nadmin:") + 1 :]
    assert body == render(COMPOSE_ENVOY_OPTIONS), (
        "deploy/compose/envoy.yaml drifted: regenerate it as its header says"
    )


def test_envoy_config_validates(tmp_path: Path) -> None:
    assert envoy_validate(COMPOSE_ENVOY.read_text(encoding="utf-8"), tmp_path) == ""


def test_ports_agree_with_envoy(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(COMPOSE_ENVOY.read_text(encoding="utf-8"))
    envoy = services["envoy"]
    assert envoy["network_mode"] == "service:extproc"
    mount = f"./{COMPOSE_ENVOY.relative_to(ROOT)}:/etc/envoy/envoy.yaml:ro"
    assert mount in envoy["volumes"]
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    published = services["extproc"]["ports"]
    assert f"{listener['port_value']}:{listener['port_value']}" in published
    clusters = config["static_resources"]["clusters"]
    extproc = endpoint(named(clusters, "ext_proc"))["socket_address"]
    listen = services["extproc"]["environment"]["EXTPROC_LISTEN"]
    assert listen == f"{extproc['address']}:{extproc['port_value']}"
    assert services["extproc"]["healthcheck"]["test"][-1] == listen
    upstream = endpoint(named(clusters, "llm"))["socket_address"]
    command = services["upstream"]["command"]
    assert upstream["address"] == "upstream"
    assert command[command.index("--listen") + 1] == f"0.0.0.0:{upstream['port_value']}"


def test_tokenizer_path_is_in_the_demo_image(services: dict[str, dict[str, Any]]) -> None:
    mapping = services["extproc"]["environment"]["EXTPROC_TOKENIZERS"]
    alias, _, path = mapping.partition("=")
    command = services["enable-model"]["command"]
    assert command[:3] == ["models", "enable", alias]
    upstream = services["upstream"]["command"]
    assert upstream[upstream.index("--tokenizer") + 1] == path
    assert re.search(rf"^COPY --from=\S+ \S+ {re.escape(path)}$", DOCKERFILE.read_text(), re.M)


def dockerfile_stages() -> set[str]:
    return set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE.read_text(), re.MULTILINE))


def _stage(name: str) -> list[str]:
    """The instruction lines of one Dockerfile stage (continuations joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if re.match(rf"FROM \S+ AS {name}$", line))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("FROM ")), None)
    return lines[start:end]


def test_dockerfile_runtime_stage() -> None:
    runtime = _stage("runtime")
    assert 'ENTRYPOINT ["extproc"]' in runtime
    assert 'CMD ["serve"]' in runtime
    assert "STOPSIGNAL SIGTERM" in runtime
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users
    assert users[-1].split(":")[0] not in ("0", "root")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()


def test_dockerfile_default_target_is_the_runtime_image() -> None:
    froms = re.findall(r"^FROM (\S+) AS (\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert froms[-1] == ("runtime", "sidecar")


def test_dockerfile_installs_no_extras() -> None:
    build = _stage("build")
    installs = [line for line in build if "pip install" in line]
    assert installs
    assert all("[" not in line for line in installs)


def test_the_demo_image_can_run_the_demo_upstream(services: dict[str, dict[str, Any]]) -> None:
    assert services["upstream"]["command"][0] == "demo-upstream"
    venv = _stage("demo-venv")
    assert venv[0] == "FROM build AS demo-venv"
    assert any(re.search(r'pip install "\.\[demo\]"', line) for line in venv)
    demo = _stage("demo")
    assert demo[0] == "FROM runtime AS demo"
    assert "COPY --from=demo-venv /opt/extproc /opt/extproc" in demo
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(d.startswith("aiohttp") for d in project["optional-dependencies"]["demo"])


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") :][:4] == ["*", "!pyproject.toml", "!README.md", "!extproc/"]
