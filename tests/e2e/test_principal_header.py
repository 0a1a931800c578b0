"""A trusted principal header: every shipped Envoy drops the client's copy, only the auth's counts;
and hostile bodies through each of those Envoys: no marker reaches the upstream.

One server trusts ``x-extproc-principal``; in front of it run, side by side, the shipped
bootstrap, the Istio EnvoyFilter applied to a sidecar's inbound listener and the Envoy Gateway
policies applied to a gateway listener, each with a Lua filter standing in for the
authentication filter that sets the header.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from extproc.core import codec
from extproc.principals import parse_principal_source
from tests.deploy.manifests import as_gateway_listener, as_istio_sidecar, hcm_of
from tests.e2e.chat import cached_request, exchange, send, usage_of, wait_for_read
from tests.plugins.stack import Stack, StackSettings, launch_envoy

pytestmark = pytest.mark.e2e

HEADER = "x-extproc-principal"
# Stands in for an authentication filter: keys "good-<tenant>-<anything>" belong to <tenant>.
AUTH_LUA = """
function envoy_on_request(handle)
  local auth = handle:headers():get("authorization")
  if auth ~= nil and string.sub(auth, 1, 12) == "Bearer good-" then
    local tenant = string.match(string.sub(auth, 13), "^([a-z0-9]+)-")
    if tenant ~= nil then
      handle:headers():replace("@HEADER@", "tenant-" .. tenant)
    end
  end
end
"""


def auth_filter(header: str) -> Callable[[dict[str, Any]], None]:
    """A patch putting the stand-in authentication filter, setting ``header``, first."""

    def insert(config: dict[str, Any]) -> None:
        lua = {
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": AUTH_LUA.replace("@HEADER@", header)},
            },
        }
        hcm_of(config)["http_filters"].insert(0, lua)

    return insert


# This module also runs Envoy -> server over a Unix socket (the others use loopback TCP).
STACK = StackSettings(
    principal_source=f"header:{HEADER}", envoy_patch=auth_filter(HEADER), unix_socket=True
)
DEPLOYMENTS = {"istio": as_istio_sidecar, "envoy-gateway": as_gateway_listener}


@pytest.fixture(scope="module", params=["bootstrap", *DEPLOYMENTS])
def front(
    request: pytest.FixtureRequest, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Stack:
    """The stack seen through one shipped deployment's Envoy."""
    if request.param == "bootstrap":
        return stack
    stack.require_local()
    workdir: Path = tmp_path_factory.mktemp(request.param)
    patches = (DEPLOYMENTS[request.param], auth_filter(HEADER))
    url, _ = launch_envoy(stack, STACK, workdir, patches, name=f"envoy-{request.param}")
    return dataclasses.replace(stack, url=url)


def tenant() -> str:
    return secrets.token_hex(4)


def key(of: str) -> str:
    return f"good-{of}-{secrets.token_hex(6)}"


def written(stack: Stack, bearer: str) -> dict[str, Any]:
    body = cached_request()
    send(stack, body, bearer)
    return wait_for_read(stack, body, bearer)


def forged(stack: Stack, bearer: str, victim: str, header: str | None = None) -> dict[str, Any]:
    """The usage of a request whose client itself names ``victim``'s principal in ``header``.

    ``header`` is by default the one the server trusts.
    """
    header = header or parse_principal_source(stack.principal_source).stripped_header
    with stack.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json=cached_request(),
            # Mixed case on the wire: header names are case-insensitive, and so is the removal.
            headers={"authorization": f"Bearer {bearer}", header.title(): f"tenant-{victim}"},
        )
    assert response.status_code == 200
    return dict(response.json()["usage"])


def check_keys_of_one_tenant_share_its_entries(stack: Stack) -> None:
    owner = tenant()
    first = written(stack, key(owner))

    usage = usage_of(send(stack, cached_request(), key(owner)), streamed=False)

    assert usage["cache_read_input_tokens"] == first["cache_read_input_tokens"] > 0


def check_forged_header_names_no_one(stack: Stack, header: str | None = None) -> None:
    """A request without a known key, naming a victim in ``header``, gets no principal at all."""
    victim = tenant()
    written(stack, key(victim))

    usage = forged(stack, f"bad-{secrets.token_hex(6)}", victim, header)

    assert "cache_read_input_tokens" not in usage  # no principal at all: left untouched


def test_keys_of_one_tenant_share_its_entries(front: Stack) -> None:
    check_keys_of_one_tenant_share_its_entries(front)


def test_a_client_supplied_principal_header_is_dropped(front: Stack) -> None:
    check_forged_header_names_no_one(front)


def test_the_auth_filter_wins_over_a_forged_header(front: Stack) -> None:
    victim = tenant()
    written(front, key(victim))

    usage = forged(front, key(tenant()), victim)

    assert usage["cache_read_input_tokens"] == 0
    assert usage["cache_creation_input_tokens"] > 0


# ---- hostile bodies through each deployment ----

CUT = b',"cache_control":{"type":"ephemeral"}'
LOSSLESS = (
    b'{"model":"demo","n":1180591620717411303424,"x":1e400,"s":"\\ud800 lone","k":1,"k":2,'
    b'"messages":[{"role":"user","content":[{"type":"text","text":"hello"' + CUT + b"}]}]}"
)


def test_values_only_a_lossless_reader_reads_pass_as_sent_without_markers(front: Stack) -> None:
    result = exchange(front, LOSSLESS, key(tenant()))

    # The fake upstream's own parser refuses 1e400 (its 400 is passed through): what matters is
    # what it received.
    assert result.upstream_body == LOSSLESS.replace(CUT, b"")


@pytest.mark.parametrize(
    ("raw", "code", "message"),
    [
        pytest.param(
            b'{"model":"demo","messages":[{"role":"user","content":[{"type":"text","text":"x",'
            b'"cache_control":{"type":"ephemeral","ttl":"2h"}}]}]}',
            "invalid_cache_control",
            'invalid cache_control ttl: "2h"',
            id="bad-ttl",
        ),
        pytest.param(
            '{"model":"demo","messages":[{"role":"user","content":[{"type":"text","text":"x",'
            '"cache_control":{"type":"ephemeral"}}]}]}'.encode("utf-16"),
            "unreadable_body",
            "request body is not valid JSON; cache_control markers can only be read in a "
            "valid UTF-8 JSON body",
            id="utf-16-with-a-marker",
        ),
    ],
)
def test_a_refused_body_never_reaches_the_upstream(
    front: Stack, raw: bytes, code: str, message: str
) -> None:
    result = exchange(front, raw, key(tenant()))

    assert result.status == 400, result.body
    error = codec.loads(result.body)["error"]
    assert (error["code"], error["message"]) == (code, message)
    assert result.upstream_body is None
