"""Which request headers an Envoy configuration removes before its ext_proc filter sees them.

Rules:
* a removal counts only where it runs before every HTTP filter of the chain, or at least
  before ext_proc: the HTTP connection manager's early header mutation, or a header-mutation
  HTTP filter placed ahead of the ext_proc filter;
* a route's ``request_headers_to_remove`` does not count: Envoy applies it at the router, after
  ext_proc (and any authentication filter) has seen the header; it is reported separately;
* understood shapes: an Envoy bootstrap (YAML or JSON), a Kubernetes ConfigMap holding one, an
  Istio ``EnvoyFilter`` (HCM merges and ``INSERT_FIRST`` header-mutation filters) and an Envoy
  Gateway ``ClientTrafficPolicy`` (``headers.earlyRequestHeaders.remove``);
* where a file holds several places that run ext_proc, a header counts as removed only when
  every one of them removes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.core.defaults import ENVOY_FILTER_NAME as EXTPROC_FILTER
from extproc.core.errors import ExtprocError
from extproc.principals import PrincipalKind, PrincipalSource

HEADER_MUTATION = "envoy.filters.http.header_mutation"
HCM_TYPE = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


class StrippingError(ExtprocError):
    """The file cannot be read as an Envoy configuration."""


@dataclass(frozen=True, slots=True)
class Stripping:
    """What a configuration removes: before ext_proc everywhere, and only at the router."""

    places: int
    removed: frozenset[str]
    late: frozenset[str]


def _yaml() -> Any:
    """PyYAML, which only reading a config file needs (it comes with the dev extra)."""
    try:
        import yaml
    except ImportError:
        raise StrippingError(
            "reading an Envoy configuration needs PyYAML: pip install 'extproc[dev]'"
        ) from None
    return yaml


def read_stripping(path: Path) -> Stripping:
    """The stripping of the configuration in ``path``; ``StrippingError`` when unreadable."""
    yaml = _yaml()
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    except OSError as exc:
        raise StrippingError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise StrippingError(f"{path}: not YAML or JSON: {exc}") from None
    if not all(isinstance(d, dict) for d in documents):
        raise StrippingError(f"{path}: not an Envoy configuration")
    return stripping_of(documents)


def stripping_of(documents: Iterable[dict[str, Any]]) -> Stripping:
    """The stripping of parsed documents (see the module rules)."""
    places: list[frozenset[str]] = []
    late: set[str] = set()
    for document in documents:
        for bootstrap in _bootstraps(document):
            for hcm in _hcms(bootstrap):
                place = _hcm_removal(hcm)
                if place is not None:
                    places.append(place)
                late |= _route_removals(hcm.get("route_config") or {})
        place = _policy_removal(document)
        if place is not None:
            places.append(place)
    removed = frozenset.intersection(*places) if places else frozenset()
    return Stripping(len(places), removed, frozenset(late))


def principal_header_problems(
    source: PrincipalSource, stripping: Stripping, where: str
) -> list[str]:
    """Why ``where`` would let a client choose the principal that ``source`` trusts."""
    if source.kind is not PrincipalKind.HEADER:
        return []
    name = source.stripped_header
    if not stripping.places:
        return [
            f"{where} has no ext_proc filter and no early header removal: cannot tell whether "
            f"Envoy removes a client's {name} before ext_proc"
        ]
    if name in stripping.removed:
        return []
    others = ", ".join(sorted(stripping.removed)) or "nothing"
    problem = (
        f"EXTPROC_PRINCIPAL_SOURCE={source}, but {where} does not remove a client's {name} "
        f"before the ext_proc filter (it removes: {others}), so any client could name another "
        "tenant's principal"
    )
    if name in stripping.late:
        problem += (
            f"; its routes remove {name} with request_headers_to_remove, which Envoy applies at "
            "the router, after ext_proc"
        )
    render = f"python -m extproc.devtools.envoyconf render --principal-header {name}"
    return [f"{problem}; remove {name} before every HTTP filter (`{render}` renders a bootstrap)"]


def _bootstraps(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if "static_resources" in document:
        yield document
    elif document.get("kind") == "ConfigMap":
        for text in (document.get("data") or {}).values():
            parsed = _yaml().safe_load(text) if isinstance(text, str) else None
            if isinstance(parsed, dict) and "static_resources" in parsed:
                yield parsed


def _hcms(bootstrap: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for listener in bootstrap["static_resources"].get("listeners") or []:
        chains = list(listener.get("filter_chains") or [])
        if listener.get("default_filter_chain"):
            chains.append(listener["default_filter_chain"])
        for chain in chains:
            for network_filter in chain.get("filters") or []:
                typed = network_filter.get("typed_config") or {}
                if str(typed.get("@type", "")).endswith(HCM_TYPE):
                    yield typed


def _hcm_removal(hcm: dict[str, Any]) -> frozenset[str] | None:
    """Removed before ext_proc in this connection manager; ``None`` when it runs no ext_proc."""
    filters = hcm.get("http_filters") or []
    position = next((i for i, f in enumerate(filters) if _is_ext_proc(f)), None)
    if position is None:
        return None
    removed = set(_early_removals(hcm))
    for http_filter in filters[:position]:
        removed |= _filter_removals(http_filter)
    return frozenset(removed)


def _is_ext_proc(http_filter: dict[str, Any]) -> bool:
    wrapped = (http_filter.get("typed_config") or {}).get("extension_config") or {}
    return EXTPROC_FILTER in (http_filter.get("name"), wrapped.get("name"))


def _early_removals(hcm: dict[str, Any]) -> Iterator[str]:
    for extension in hcm.get("early_header_mutation_extensions") or []:
        for mutation in (extension.get("typed_config") or {}).get("mutations") or []:
            if isinstance(mutation.get("remove"), str):
                yield mutation["remove"].lower()


def _filter_removals(http_filter: dict[str, Any]) -> set[str]:
    if http_filter.get("name") != HEADER_MUTATION:
        return set()
    mutations = ((http_filter.get("typed_config") or {}).get("mutations") or {}).get(
        "request_mutations"
    ) or []
    return {m["remove"].lower() for m in mutations if isinstance(m.get("remove"), str)}


def _route_removals(route_config: dict[str, Any]) -> set[str]:
    layers = [route_config]
    for host in route_config.get("virtual_hosts") or []:
        layers += [host, *(host.get("routes") or [])]
    names = (n for layer in layers for n in layer.get("request_headers_to_remove") or [])
    return {str(name).lower() for name in names}


def _policy_removal(document: dict[str, Any]) -> frozenset[str] | None:
    """Istio's and Envoy Gateway's early removals; ``None`` for other documents."""
    spec = document.get("spec") or {}
    if document.get("kind") == "ClientTrafficPolicy":
        early = (spec.get("headers") or {}).get("earlyRequestHeaders") or {}
        return frozenset(str(name).lower() for name in early.get("remove") or [])
    if document.get("kind") != "EnvoyFilter":
        return None
    patches = spec.get("configPatches") or []
    if not any(_is_ext_proc((p.get("patch") or {}).get("value") or {}) for p in patches):
        return None
    removed: set[str] = set()
    for patch in patches:
        change = patch.get("patch") or {}
        value = change.get("value") or {}
        if patch.get("applyTo") == "NETWORK_FILTER" and change.get("operation") == "MERGE":
            removed |= set(_early_removals(value.get("typed_config") or {}))
        if patch.get("applyTo") == "HTTP_FILTER" and change.get("operation") == "INSERT_FIRST":
            removed |= _filter_removals(value)
    return frozenset(removed)
