"""A principal header of the operator's choosing: the rendered bootstrap strips that name.

The server trusts ``x-tenant~id`` (any RFC 9110 token the settings accept works end to end);
the stack renders its bootstrap for the same name, as ``python -m extproc.devtools.envoyconf render
--principal-header x-tenant~id`` does, and the stand-in authentication filter sets it.
"""

from __future__ import annotations

import pytest

from extproc.principals import DEFAULT_PRINCIPAL_HEADER
from tests.e2e.test_principal_header import (
    auth_filter,
    check_forged_header_names_no_one,
    check_keys_of_one_tenant_share_its_entries,
)
from tests.plugins.stack import Stack, StackSettings

pytestmark = pytest.mark.e2e

HEADER = "x-tenant~id"
STACK = StackSettings(principal_source=f"header:{HEADER}", envoy_patch=auth_filter(HEADER))


def test_the_chosen_header_names_the_tenant(stack: Stack) -> None:
    check_keys_of_one_tenant_share_its_entries(stack)


def test_a_client_supplied_copy_of_the_chosen_header_is_dropped(stack: Stack) -> None:
    check_forged_header_names_no_one(stack)


def test_the_default_header_names_no_one_here(stack: Stack) -> None:
    check_forged_header_names_no_one(stack, DEFAULT_PRINCIPAL_HEADER)
