"""A trusted principal header: Envoy drops the client's copy, only the auth filter's counts."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from tests.e2e.chat import cached_request, send, usage_of, wait_for_read
from tests.plugins.stack import Stack, StackSettings

pytestmark = pytest.mark.e2e

HEADER = "x-extproc-principal"
# Stands in for an authentication filter: keys "good-<tenant>-<anything>" belong to <tenant>.
AUTH_LUA = """
function envoy_on_request(handle)
  local auth = handle:headers():get("authorization")
  if auth ~= nil and string.sub(auth, 1, 12) == "Bearer good-" then
    local tenant = string.match(string.sub(auth, 13), "^([a-z0-9]+)-")
    if tenant ~= nil then
      handle:headers():replace("x-extproc-principal", "tenant-" .. tenant)
    end
  end
end
"""


def _insert_auth_filter(config: dict[str, Any]) -> None:
    listener = config["static_resources"]["listeners"][0]
    filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    lua = {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": AUTH_LUA},
        },
    }
    filters.insert(0, lua)


# This module also runs Envoy -> server over a Unix socket (the others use loopback TCP).
STACK = StackSettings(
    principal_source=f"header:{HEADER}", envoy_patch=_insert_auth_filter, unix_socket=True
)


def _tenant() -> str:
    return secrets.token_hex(4)


def _key(tenant: str) -> str:
    return f"good-{tenant}-{secrets.token_hex(6)}"


def _written(stack: Stack, key: str) -> dict[str, Any]:
    body = cached_request()
    send(stack, body, key)
    return wait_for_read(stack, body, key)


def test_keys_of_one_tenant_share_its_entries(stack: Stack) -> None:
    tenant = _tenant()
    first = _written(stack, _key(tenant))

    usage = usage_of(send(stack, cached_request(), _key(tenant)), streamed=False)

    assert usage["cache_read_input_tokens"] == first["cache_read_input_tokens"] > 0


def _forged(stack: Stack, key: str, victim: str) -> dict[str, Any]:
    with stack.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json=cached_request(),
            headers={"authorization": f"Bearer {key}", HEADER: f"tenant-{victim}"},
        )
    assert response.status_code == 200
    return dict(response.json()["usage"])


def test_a_client_supplied_principal_header_is_dropped(stack: Stack) -> None:
    victim = _tenant()
    _written(stack, _key(victim))

    usage = _forged(stack, f"bad-{secrets.token_hex(6)}", victim)

    assert "cache_read_input_tokens" not in usage  # no principal at all: left untouched


def test_the_auth_filter_wins_over_a_forged_header(stack: Stack) -> None:
    victim = _tenant()
    _written(stack, _key(victim))

    usage = _forged(stack, _key(_tenant()), victim)

    assert usage["cache_read_input_tokens"] == 0
    assert usage["cache_creation_input_tokens"] > 0
