"""deploy/kubernetes: schema-valid manifests whose pieces agree with each other and the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes_validate import utils as k8s

from extproc.config import KNOWN_KEYS, PREFIX, Settings
from extproc.devtools.envoyconf import EnvoyOptions, render
from tests.deploy.manifests import ENVOY_IMAGE, ROOT, endpoint, envoy_validate, load_all, named

K8S = ROOT / "deploy" / "kubernetes"
GATEWAY = ROOT / "deploy" / "envoy-gateway"
K8S_VERSION = "1.34.0"
# The upstream the bootstrap in envoy-configmap.yaml is rendered for (its header says so).
UPSTREAM_URL = "http://llm:8000"
SECRET = {"name": "extproc-database", "key": "url"}
CORE_KINDS = {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "Job"}


def _documents(*folders: Path) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for folder in folders:
        for path in sorted(folder.glob("*.yaml")):
            found += [(f"{path.name}:{doc['kind']}", doc) for doc in load_all(path)]
    return found


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(doc, id=name)
        for name, doc in _documents(K8S, GATEWAY)
        if doc["kind"] in CORE_KINDS
    ],
)
def test_manifest_matches_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    try:
        k8s.validate(doc, K8S_VERSION, strict=True)
    except k8s.ValidationError as exc:
        pytest.fail(f"{'.'.join(map(str, exc.path))}: {exc.message}")


def _one(kind: str, name: str | None = None, folder: Path = K8S) -> dict[str, Any]:
    docs = [d for _, d in _documents(folder) if d["kind"] == kind]
    docs = [d for d in docs if name is None or d["metadata"]["name"] == name]
    assert len(docs) == 1, f"expected one {kind} {name or ''}"
    return docs[0]


@pytest.fixture(scope="module")
def pod() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment")["spec"]["template"]
    return spec


@pytest.fixture(scope="module")
def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["spec"]["containers"]}


@pytest.fixture(scope="module")
def settings_data() -> dict[str, str]:
    data: dict[str, str] = _one("ConfigMap", "extproc-settings")["data"]
    return data


def test_kustomization_lists_every_long_lived_manifest() -> None:
    kustomization = load_all(K8S / "kustomization.yaml")[0]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "migrate-job.yaml"}
    assert set(kustomization["resources"]) == files
    images = {i["name"] for i in kustomization["images"]}
    assert images == {c["image"].partition(":")[0] for _, c in _own_images()}


def _own_images() -> list[tuple[str, dict[str, Any]]]:
    docs = [d for _, d in _documents(K8S, GATEWAY) if d["kind"] in ("Deployment", "Job")]
    return [
        (d["metadata"]["name"], c)
        for d in docs
        for c in d["spec"]["template"]["spec"]["containers"]
        if c["name"] != "envoy"
    ]


def test_images_are_pinned(containers: dict[str, dict[str, Any]]) -> None:
    assert containers["envoy"]["image"] == ENVOY_IMAGE
    tags = {c["image"].partition(":")[2] for _, c in _own_images()}
    assert len(tags) == 1
    assert tags.pop() not in ("", "latest")


def test_settings_are_valid_server_settings(settings_data: dict[str, str]) -> None:
    assert set(settings_data) <= {PREFIX + key for key in KNOWN_KEYS}
    assert f"{PREFIX}DATABASE_URL" not in settings_data, "the database URL belongs in the Secret"
    Settings.from_env({**settings_data, "EXTPROC_DATABASE_URL": "postgresql://x@db/extproc"})


def test_database_url_comes_from_the_secret() -> None:
    for name, container in _own_images():
        env = {e["name"]: e for e in container.get("env", [])}
        source = env["EXTPROC_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert source == SECRET, name


def _settings(data: dict[str, str]) -> Settings:
    return Settings.from_env({**data, "EXTPROC_DATABASE_URL": "postgresql://x@db/extproc"})


def test_envoy_bootstrap_is_rendered_from_the_settings(settings_data: dict[str, str]) -> None:
    settings = _settings(settings_data)
    options = EnvoyOptions(
        upstream_url=UPSTREAM_URL,
        extproc_address=f"127.0.0.1:{settings.listen.rpartition(':')[2]}",
        max_body_bytes=settings.max_body_bytes,
        classify_deadline_ms=settings.classify_deadline_ms,
        principal_header=settings.principal_source.stripped_header,
    )
    text = _one("ConfigMap", "extproc-envoy")["data"]["envoy.yaml"]
    assert text == render(options), "envoy-configmap.yaml drifted: re-render it"


def test_envoy_bootstrap_validates(tmp_path: Path) -> None:
    text = _one("ConfigMap", "extproc-envoy")["data"]["envoy.yaml"]
    assert envoy_validate(text, tmp_path) == ""


def _envoy_config() -> dict[str, Any]:
    import yaml

    config: dict[str, Any] = yaml.safe_load(
        _one("ConfigMap", "extproc-envoy")["data"]["envoy.yaml"]
    )
    return config


def test_ports_agree(containers: dict[str, dict[str, Any]], settings_data: dict[str, str]) -> None:
    config = _envoy_config()
    grpc_port = int(settings_data["EXTPROC_LISTEN"].rpartition(":")[2])
    extproc = containers["extproc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert extproc[probe]["grpc"]["port"] == grpc_port, probe
    cluster = endpoint(named(config["static_resources"]["clusters"], "ext_proc"))
    assert cluster["socket_address"] == {"address": "127.0.0.1", "port_value": grpc_port}
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    envoy_ports = {p["name"]: p["containerPort"] for p in containers["envoy"]["ports"]}
    assert envoy_ports["http"] == listener["port_value"]
    metrics = int(settings_data["EXTPROC_METRICS_LISTEN"].rpartition(":")[2])
    assert {p["name"]: p["containerPort"] for p in extproc["ports"]}["metrics"] == metrics


def test_envoy_mounts_its_bootstrap(
    pod: dict[str, Any], containers: dict[str, dict[str, Any]]
) -> None:
    envoy = containers["envoy"]
    mount = next(m for m in envoy["volumeMounts"] if m["mountPath"] == "/etc/envoy")
    volume = named(pod["spec"]["volumes"], mount["name"])
    assert volume["configMap"]["name"] == "extproc-envoy"
    assert envoy["args"][envoy["args"].index("-c") + 1] == "/etc/envoy/envoy.yaml"


def test_containers_run_locked_down(pod: dict[str, Any]) -> None:
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for container in pod["spec"]["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert context["runAsUser"] != 0, container["name"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert "memory" in resources["limits"], container["name"]


def test_shutdown_fits_the_grace_period(
    pod: dict[str, Any], containers: dict[str, dict[str, Any]], settings_data: dict[str, str]
) -> None:
    pause = containers["extproc"]["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(settings_data["EXTPROC_SHUTDOWN_GRACE_S"])
    assert pause + drain < pod["spec"]["terminationGracePeriodSeconds"]


def test_selectors_match_the_pods(pod: dict[str, Any]) -> None:
    labels = pod["metadata"]["labels"]
    deployment = _one("Deployment")
    for selector in (
        _one("Service")["spec"]["selector"],
        _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()


def test_service_targets_named_ports(containers: dict[str, dict[str, Any]]) -> None:
    names = {p["name"] for c in containers.values() for p in c["ports"]}
    targets = {p["targetPort"] for p in _one("Service")["spec"]["ports"]}
    assert targets <= names
    assert "grpc" not in targets, "ext_proc must not be reachable through the Service"


def test_migration_job() -> None:
    job = _one("Job")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    assert container["args"] == ["migrate"]
    assert job["restartPolicy"] in ("OnFailure", "Never")
    deployment = {c["name"]: c["image"] for c in _own_images_of("extproc")}
    assert container["image"] == deployment["extproc"]


def _own_images_of(deployment: str) -> list[dict[str, Any]]:
    return [c for name, c in _own_images() if name == deployment]
