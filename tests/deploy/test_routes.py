"""The shipped Envoy routes send exactly the requests a dialect serves through ext_proc.

Envoy's route matching is replayed on the bootstrap's route table (first match wins; a
``safe_regex`` must match the whole path without its query) and on the Istio matcher, and
compared with ``dialects.for_request`` for the same requests. The Istio matcher is also run
through a real Envoy in ``test_mesh.py``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from extproc.core.dialects import for_request
from extproc.devtools.envoyconf import EXTPROC_FILTER, template_text
from tests.deploy.manifests import istio_patches

REQUESTS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/openai/v1/chat/completions?api-version=1"),
    ("POST", "/v1/chat/completions?cacheBreakpoint=lastUserMessage"),
    ("POST", "/v1/messages"),
    ("POST", "/anthropic/v1/messages?beta=true"),
    ("POST", "/v1/responses"),
    ("POST", "/proxy/v1/responses"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/v1/responses/resp_1/cancel"),
    ("POST", "/v1/threads/thread_1/messages"),
    ("GET", "/v1/responses/resp_1"),
    ("GET", "/v1/messages"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
]
IDS = [f"{m} {p}" for m, p in REQUESTS]


def _routes() -> list[dict[str, Any]]:
    config = yaml.safe_load(template_text())
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes: list[dict[str, Any]] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def _matches(match: dict[str, Any], method: str, path: str) -> bool:
    base, _, query = path.partition("?")
    if "path" in match and base != match["path"]:
        return False
    if "prefix" in match and not base.startswith(match["prefix"]):
        return False
    if "safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], base) is None:
        return False
    for header in match.get("headers", []):
        assert header["name"] == ":method"
        if method != header["string_match"]["exact"]:
            return False
    names = {part.partition("=")[0] for part in query.split("&") if part}
    return all(p["name"] in names for p in match.get("query_parameters", []))


def _reaches_ext_proc(method: str, path: str) -> bool:
    route = next(r for r in _routes() if _matches(r["match"], method, path))
    per_filter = route.get("typed_per_filter_config", {}).get(EXTPROC_FILTER, {})
    return per_filter.get("disabled") is not True


@pytest.mark.parametrize(("method", "path"), REQUESTS, ids=IDS)
def test_bootstrap_routes_agree_with_the_dialects(method: str, path: str) -> None:
    assert _reaches_ext_proc(method, path) is (for_request(method, path) is not None)


def _istio_regex() -> str:
    value = istio_patches()["HTTP_FILTER"]["patch"]["value"]["typed_config"]
    (predicate, _method) = value["xds_matcher"]["matcher_list"]["matchers"][0]["predicate"][
        "or_matcher"
    ]["predicate"]
    regex: str = predicate["not_matcher"]["single_predicate"]["value_match"]["safe_regex"]["regex"]
    return regex


@pytest.mark.parametrize(("method", "path"), REQUESTS, ids=IDS)
def test_istio_matcher_agrees_with_the_dialects(method: str, path: str) -> None:
    reaches = method == "POST" and re.fullmatch(_istio_regex(), path) is not None
    assert reaches is (for_request(method, path) is not None)
