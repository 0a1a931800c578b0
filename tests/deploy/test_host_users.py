"""The embedded PostgreSQL never changes the machine's users, even when the stack runs as root."""

from __future__ import annotations

import os
import pwd
import secrets

import pytest

from extproc.devtools import devstack

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root changes users")


def _users() -> set[str]:
    return {entry.pw_name for entry in pwd.getpwall()}


@needs_root
def test_as_root_postgres_runs_as_an_account_that_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(devstack.PG_USER_ENV, raising=False)
    before = _users()
    user = devstack.pg_system_user()
    assert user in before
    assert user is not None
    assert pwd.getpwnam(user).pw_uid != 0
    assert _users() == before


@needs_root
def test_a_missing_account_is_an_error_not_a_new_user(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "extproc-absent-" + secrets.token_hex(3)
    monkeypatch.setenv(devstack.PG_USER_ENV, name)
    before = _users()
    with pytest.raises(devstack.DevStackError, match=devstack.PG_USER_ENV):
        devstack.pg_system_user()
    assert name not in _users()
    assert _users() == before


@needs_root
def test_root_itself_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(devstack.PG_USER_ENV, "root")
    with pytest.raises(devstack.DevStackError, match="refuses to run as root"):
        devstack.pg_system_user()


def test_not_root_runs_postgres_as_itself() -> None:
    if os.geteuid() == 0:
        pytest.skip("the caller is root here")
    assert devstack.pg_system_user() is None
