"""A principal header of the operator's choosing: the rendered bootstrap strips that name.

The server trusts ``x-tenant~id`` (any RFC 9110 token the settings accept works end to end);
the stack renders its bootstrap for the same name, as ``python -m extproc.envoyconf render
--principal-header x-tenant~id`` does, and the stand-in authentication filter sets it.
"""

from __future__ import annotations

import secrets

import pytest

from extproc.principals import DEFAULT_PRINCIPAL_HEADER
from tests.e2e.chat import cached_request, send, usage_of
from tests.e2e.test_principal_header import auth_filter, forged, key, tenant, written
from tests.plugins.stack import Stack, StackSettings

pytestmark = pytest.mark.e2e

HEADER = "x-tenant~id"
STACK = StackSettings(principal_source=f"header:{HEADER}", envoy_patch=auth_filter(HEADER))


def test_the_chosen_header_names_the_tenant(stack: Stack) -> None:
    owner = tenant()
    first = written(stack, key(owner))

    usage = usage_of(send(stack, cached_request(), key(owner)), streamed=False)

    assert usage["cache_read_input_tokens"] == first["cache_read_input_tokens"] > 0


def test_a_client_supplied_copy_of_the_chosen_header_is_dropped(stack: Stack) -> None:
    victim = tenant()
    written(stack, key(victim))

    usage = forged(stack, f"bad-{secrets.token_hex(6)}", victim)

    assert "cache_read_input_tokens" not in usage


def test_the_default_header_names_no_one_here(stack: Stack) -> None:
    victim = tenant()
    written(stack, key(victim))

    usage = forged(stack, f"bad-{secrets.token_hex(6)}", victim, DEFAULT_PRINCIPAL_HEADER)

    assert "cache_read_input_tokens" not in usage
