"""Every shipped Envoy configuration writes the JSON access log with the accounting record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.core.record import NAMESPACE
from extproc.devtools.envoyconf import FILE_LOG, EnvoyOptions, render, template_text
from tests.deploy.manifests import (
    ROOT,
    envoy_validate,
    ext_proc_filter,
    gateway_documents,
    hcm_of,
    istio_patches,
    load_all,
)

RECORD_FIELD = ("prompt_cache", f"%DYNAMIC_METADATA({NAMESPACE})%")
USUAL_FIELDS = {"start", "request_id", "method", "path", "route", "code", "flags", "duration_ms"}


def _bootstrap_files() -> list[tuple[str, dict[str, Any]]]:
    found = [
        (name, yaml.safe_load((ROOT / name).read_text(encoding="utf-8")))
        for name in ("envoy/envoy.yaml", "envoy/envoy-fail-open.yaml", "deploy/compose/envoy.yaml")
    ]
    (configmap,) = [
        d
        for d in load_all(ROOT / "deploy" / "kubernetes" / "envoy-configmap.yaml")
        if d["kind"] == "ConfigMap"
    ]
    found.append(("kubernetes configmap", yaml.safe_load(configmap["data"]["envoy.yaml"])))
    return found


BOOTSTRAPS = [pytest.param(config, id=name) for name, config in _bootstrap_files()]


def _shipped_format() -> dict[str, str]:
    (log,) = hcm_of(yaml.safe_load(template_text()))["access_log"]
    found: dict[str, str] = log["typed_config"]["log_format"]["json_format"]
    return found


def test_the_shipped_format_has_the_record_and_the_usual_fields() -> None:
    shipped = _shipped_format()

    assert RECORD_FIELD in shipped.items()
    assert set(shipped) >= USUAL_FIELDS


@pytest.mark.parametrize("config", BOOTSTRAPS)
def test_bootstrap_logs_the_record_it_accepts(config: dict[str, Any]) -> None:
    (log,) = hcm_of(config)["access_log"]

    assert log["typed_config"]["log_format"]["json_format"] == _shipped_format()
    assert ext_proc_filter(config)["metadata_options"] == {
        "receiving_namespaces": {"untyped": [NAMESPACE]}
    }


def test_istio_logs_the_record_it_accepts() -> None:
    patches = istio_patches()
    hcm = patches["NETWORK_FILTER"]["patch"]["value"]["typed_config"]
    (log,) = hcm["access_log"]
    ext_proc = patches["HTTP_FILTER"]["patch"]["value"]["typed_config"]["extension_config"]

    assert log["typed_config"]["log_format"]["json_format"] == _shipped_format()
    assert ext_proc["typed_config"]["metadata_options"]["receiving_namespaces"] == {
        "untyped": [NAMESPACE]
    }


def test_envoy_gateway_logs_the_record_it_accepts() -> None:
    docs = gateway_documents()
    (setting,) = docs["EnvoyProxy"]["spec"]["telemetry"]["accessLog"]["settings"]
    (ext_proc,) = docs["EnvoyExtensionPolicy"]["spec"]["extProc"]

    assert setting["format"] == {"type": "JSON", "json": _shipped_format()}
    assert ext_proc["metadata"]["writableNamespaces"] == [NAMESPACE]


def test_a_file_access_log_renders_to_a_valid_bootstrap(tmp_path: Path) -> None:
    path = str(tmp_path / "access.log")
    config = yaml.safe_load(render(EnvoyOptions(access_log_path=path)))
    (log,) = hcm_of(config)["access_log"]

    assert log["name"] == FILE_LOG
    assert log["typed_config"]["path"] == path
    assert log["typed_config"]["log_format"]["json_format"] == _shipped_format()
    assert envoy_validate(yaml.safe_dump(config, sort_keys=False), tmp_path) == ""
