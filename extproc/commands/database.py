"""Database access for the administration sub-commands: where to connect, and error reporting."""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Mapping

import psycopg
from psycopg.rows import TupleRow

from extproc.adapters.postgres import describe
from extproc.core.errors import ExtprocError

Command = Callable[[argparse.Namespace], int]
Connection = psycopg.Connection[TupleRow]

_PG_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


class AdminError(ExtprocError):
    """An administration command could not do what it was asked."""


def database_conninfo(env: Mapping[str, str]) -> str:
    """The database to administer; an empty string lets libpq read its ``PG*`` variables."""
    url = env.get("EXTPROC_DATABASE_URL", "").strip()
    if url:
        return url
    if any(env.get(name) for name in _PG_ENV):
        return ""
    raise AdminError(
        "set EXTPROC_DATABASE_URL (or libpq's PG* variables) to the PostgreSQL database to use"
    )


def connect() -> Connection:
    return psycopg.connect(database_conninfo(os.environ), connect_timeout=10)


def database_command(command: Command) -> Command:
    """Report psycopg errors as one line (no traceback) through ``AdminError``."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except psycopg.Error as exc:
            raise AdminError(f"database error: {describe(exc)}") from exc

    return run
