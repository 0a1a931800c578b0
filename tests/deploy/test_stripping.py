"""What each Envoy configuration removes before ext_proc, as ``serve --check`` reads it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.devtools.envoyconf import EnvoyOptions, render
from extproc.principals import DEFAULT_PRINCIPAL_HEADER, parse_principal_source
from extproc.stripping import (
    Stripping,
    StrippingError,
    principal_header_problems,
    read_stripping,
    stripping_of,
)
from tests.deploy.manifests import ROOT, hcm_of, istio_patches

SHIPPED = [
    ROOT / "envoy" / "envoy.yaml",
    ROOT / "envoy" / "envoy-fail-open.yaml",
    ROOT / "extproc" / "envoy" / "envoy.yaml",
    ROOT / "deploy" / "compose" / "envoy.yaml",
    ROOT / "deploy" / "kubernetes" / "envoy-configmap.yaml",
    ROOT / "deploy" / "istio" / "envoyfilter.yaml",
    ROOT / "deploy" / "envoy-gateway" / "extension-policy.yaml",
]


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(ROOT))) for p in SHIPPED])
def test_every_shipped_configuration_strips_the_documented_header(path: Path) -> None:
    stripping = read_stripping(path)
    assert stripping.places >= 1
    assert DEFAULT_PRINCIPAL_HEADER in stripping.removed
    source = parse_principal_source(f"header:{DEFAULT_PRINCIPAL_HEADER}")
    assert principal_header_problems(source, stripping, path.name) == []


def _bootstrap() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(render(EnvoyOptions(principal_header="x-a")))
    return config


def _no_early(config: dict[str, Any]) -> None:
    del hcm_of(config)["early_header_mutation_extensions"]


def _upper_case(config: dict[str, Any]) -> None:
    early = hcm_of(config)["early_header_mutation_extensions"][0]["typed_config"]
    early["mutations"] = [{"remove": "X-A"}, {"append": {"header": {"key": "x-b", "value": "1"}}}]


def _header_mutation_filter(position: int) -> Callable[[dict[str, Any]], None]:
    def patch(config: dict[str, Any]) -> None:
        _no_early(config)
        mutation = {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {"request_mutations": [{"remove": "x-a"}]},
            },
        }
        hcm_of(config)["http_filters"].insert(position, mutation)

    return patch


def _route_removal(config: dict[str, Any]) -> None:
    _no_early(config)
    for route in hcm_of(config)["route_config"]["virtual_hosts"][0]["routes"]:
        route["request_headers_to_remove"] = ["X-A"]


def _no_ext_proc(config: dict[str, Any]) -> None:
    filters = hcm_of(config)["http_filters"]
    filters[:] = [f for f in filters if f["name"] != "envoy.filters.http.ext_proc"]


def _second_listener_without_removal(config: dict[str, Any]) -> None:
    listeners = config["static_resources"]["listeners"]
    other = copy.deepcopy(listeners[0])
    other["name"] = "other"
    del other["filter_chains"][0]["filters"][0]["typed_config"]["early_header_mutation_extensions"]
    listeners.append(other)


def _bootstrap_case(patch: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    config = _bootstrap()
    if patch is not None:
        patch(config)
    return [config]


def _config_map() -> list[dict[str, Any]]:
    data = {"envoy.yaml": yaml.safe_dump(_bootstrap()), "other": "not: envoy"}
    return [{"apiVersion": "v1", "kind": "ConfigMap", "data": data}]


def _envoy_filter(*apply_to: str) -> list[dict[str, Any]]:
    patches = [p for name, p in istio_patches().items() if name in apply_to]
    return [{"kind": "EnvoyFilter", "spec": {"configPatches": patches}}]


def _client_traffic_policy() -> list[dict[str, Any]]:
    early = {"remove": ["X-A", "x-b"]}
    return [{"kind": "ClientTrafficPolicy", "spec": {"headers": {"earlyRequestHeaders": early}}}]


NONE: frozenset[str] = frozenset()
A = frozenset({"x-a"})
# The chat routes of the bootstrap remove accept-encoding at the router.
LATE = frozenset({"accept-encoding"})
CASES = [
    pytest.param(_bootstrap_case(None), Stripping(1, A, LATE), id="early"),
    pytest.param(_bootstrap_case(_upper_case), Stripping(1, A, LATE), id="upper-case"),
    pytest.param(
        _bootstrap_case(_header_mutation_filter(0)),
        Stripping(1, A, LATE),
        id="header-mutation-filter-before-ext-proc",
    ),
    pytest.param(
        _bootstrap_case(_header_mutation_filter(1)),
        Stripping(1, NONE, LATE),
        id="header-mutation-filter-after-ext-proc",
    ),
    pytest.param(
        _bootstrap_case(_route_removal), Stripping(1, NONE, A), id="route-removal-is-too-late"
    ),
    pytest.param(_bootstrap_case(_no_ext_proc), Stripping(0, NONE, LATE), id="no-ext-proc"),
    pytest.param(
        _bootstrap_case(_second_listener_without_removal),
        Stripping(2, NONE, LATE),
        id="one-listener-without-removal",
    ),
    pytest.param(_config_map(), Stripping(1, A, LATE), id="config-map"),
    pytest.param(
        _envoy_filter("NETWORK_FILTER", "HTTP_FILTER"),
        Stripping(1, frozenset({DEFAULT_PRINCIPAL_HEADER}), NONE),
        id="envoy-filter",
    ),
    pytest.param(
        _envoy_filter("HTTP_FILTER"), Stripping(1, NONE, NONE), id="envoy-filter-without-removal"
    ),
    pytest.param(
        _envoy_filter("NETWORK_FILTER"), Stripping(0, NONE, NONE), id="envoy-filter-no-ext-proc"
    ),
    pytest.param(
        _client_traffic_policy(),
        Stripping(1, frozenset({"x-a", "x-b"}), NONE),
        id="client-traffic-policy",
    ),
]


@pytest.mark.parametrize(("documents", "expected"), CASES)
def test_stripping(documents: list[dict[str, Any]], expected: Stripping) -> None:
    assert stripping_of(documents) == expected


def test_problems_name_the_header_the_file_and_the_fix() -> None:
    stripping = stripping_of(_bootstrap_case(_route_removal))
    (problem,) = principal_header_problems(
        parse_principal_source("header:X-A"), stripping, "f.yaml"
    )
    assert "header:x-a, but f.yaml does not remove a client's x-a" in problem
    assert "request_headers_to_remove" in problem
    assert "--principal-header x-a" in problem


def test_other_sources_trust_no_header() -> None:
    stripping = stripping_of(_bootstrap_case(_no_early))
    for source in ("api_keys", "key_hash"):
        assert principal_header_problems(parse_principal_source(source), stripping, "f") == []


def test_a_file_without_ext_proc_cannot_be_judged() -> None:
    stripping = stripping_of(_bootstrap_case(_no_ext_proc))
    (problem,) = principal_header_problems(parse_principal_source("header:x-a"), stripping, "f")
    assert "no ext_proc filter" in problem


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(None, "cannot read", id="missing"),
        pytest.param("a: [", "not YAML or JSON", id="not-yaml"),
        pytest.param("- 1\n- 2\n", "not an Envoy configuration", id="a-list"),
    ],
)
def test_unreadable_files_are_errors(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "envoy.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(StrippingError, match=message):
        read_stripping(path)
