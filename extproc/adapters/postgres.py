"""PostgreSQL adapter: the connection pool, statements under a deadline, the expiry sweeper.

Rules:
* every statement runs in its caller's task (no task per statement) under a client-side
  deadline that covers the wait for a pooled connection too; at the deadline the connection's
  socket is shut down, so a statement waiting for a dead or frozen server fails at once and
  the pool replaces that connection; the server's statement timeout bounds the server's side;
* a statement that failed for its connection (severed, refused, the server shutting down, the
  pool still reconnecting) is tried once more inside the same deadline, after the pool checked
  its idle connections (one check at a time, shared by every caller that needs it, since one
  dead connection usually means they are all dead); a logical error (a statement timeout, a
  constraint, bad data) is never retried;
* every psycopg error and every missed deadline becomes ``DependencyError`` here, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeAlias, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from extproc.core.errors import DependencyError

Pool: TypeAlias = AsyncConnectionPool[AsyncConnection[TupleRow]]
Connection: TypeAlias = AsyncConnection[TupleRow]
T = TypeVar("T")
Work: TypeAlias = Callable[[Connection], Awaitable[T]]

_log = logging.getLogger(__name__)


def describe(exc: BaseException) -> str:
    """A one-line, secret-free description of a database error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) or type(exc).__name__


# SQLSTATE class 08 (connection exception) and the server going away.
_CONNECTION_STATES = frozenset({"57P01", "57P02", "57P03"})


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection failed (worth one more try), not the statement."""
    if not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in _CONNECTION_STATES


async def once_more_on_connection_error(
    attempt: Callable[[], Awaitable[T]],
    what: str,
    before_retry: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """``attempt()``, repeated once (after ``before_retry``) when it failed for the connection."""
    try:
        return await attempt()
    except psycopg.Error as exc:
        if not is_connection_error(exc):
            raise
        failure = describe(exc)
    if before_retry is not None:
        await before_retry()
    _log.warning("%s: connection failed (%s), trying once more", what, failure)
    return await attempt()


def sever(conn: Connection) -> None:
    """Shut ``conn``'s socket down: whatever psycopg waits for on it fails at once."""
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:  # closed already
        return
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


class _Late(DependencyError):
    """The deadline passed before the retry could start."""


class Database:
    """Runs work on pooled connections under a deadline; see the module docstring."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._checking: asyncio.Future[None] | None = None

    async def run(self, what: str, limit: float, work: Work[T]) -> T:
        """``work(conn)`` within ``limit`` seconds; every failure is a ``DependencyError``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        try:
            return await once_more_on_connection_error(
                lambda: self._attempt(work, deadline), what, lambda: self._check_idle(deadline)
            )
        except (psycopg.Error, _Late) as exc:
            if loop.time() >= deadline:
                raise DependencyError(f"{what}: no answer within {limit:g}s") from exc
            raise DependencyError(f"{what}: {describe(exc)}") from exc

    async def _attempt(self, work: Work[T], deadline: float) -> T:
        loop = asyncio.get_running_loop()
        conn = await self.pool.getconn(timeout=max(0.0, deadline - loop.time()))
        timer = loop.call_at(deadline, sever, conn)
        try:
            return await work(conn)
        finally:
            timer.cancel()
            await self.pool.putconn(conn)

    async def _check_idle(self, deadline: float) -> None:
        """Wait (until the deadline at most) for a check of the pool's idle connections."""
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise _Late("no time left for a second try")
        if self._checking is None or self._checking.done():
            self._checking = asyncio.ensure_future(self.pool.check())
            self._checking.add_done_callback(_retrieve)
        await asyncio.wait({self._checking}, timeout=left)


def _retrieve(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        _log.warning("pool check failed: %s", describe(done.exception() or Exception()))


async def open_pool(
    url: str,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 5.0,  # noqa: ASYNC109 (the pool's wait for a connection)
    *,
    statement_timeout: float = 2.0,
) -> Pool:
    """An open pool of autocommit connections; an empty ``url`` means libpq's ``PG*`` env vars."""

    async def configure(conn: Connection) -> None:
        millis = max(1, int(statement_timeout * 1000))
        await conn.execute(f"SET statement_timeout = {millis}".encode())

    pool: Pool = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        open=False,
        configure=configure,
        kwargs={"autocommit": True, "connect_timeout": max(2, math.ceil(timeout))},
        name="extproc",
    )
    try:
        await pool.open(wait=True, timeout=timeout)
    except psycopg.Error as exc:
        await pool.close()
        raise DependencyError(f"database unavailable: {describe(exc)}") from exc
    return pool


# Replicas sweep at once without doing the same work twice: each batch locks its rows and
# skips the rows another sweeper holds.
_SWEEP = """
DELETE FROM prompt_cache_entries
WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM prompt_cache_entries
        WHERE expires_at <= now()
        ORDER BY expires_at
        LIMIT %s
        FOR UPDATE SKIP LOCKED))
  AND expires_at <= now()
"""


async def sweep_expired(pool: Pool, batch_size: int = 1000, *, deadline: float = 10.0) -> int:
    """Delete expired entries in batches of at most ``batch_size``; the number deleted."""
    database = Database(pool)

    async def sweep_batch(conn: Connection) -> int:
        cursor = await conn.execute(_SWEEP, (batch_size,))
        return cursor.rowcount

    total = 0
    while True:
        deleted = await database.run("expiry sweep", deadline, sweep_batch)
        total += deleted
        if deleted < batch_size:
            return total


class ExpirySweeper:
    """Runs ``sweep_expired`` every ``interval`` seconds until stopped."""

    def __init__(self, pool: Pool, *, interval: float = 60.0, batch_size: int = 1000) -> None:
        self._pool = pool
        self._interval = interval
        self._batch_size = batch_size
        self._task: asyncio.Task[None] | None = None
        self.deleted_total = 0
        self.failures = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="extproc-expiry-sweeper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})

    async def run_once(self) -> int:
        """One sweep now; failures are counted and logged, never raised."""
        try:
            deleted = await sweep_expired(self._pool, self._batch_size)
        except DependencyError as exc:
            self.failures += 1
            _log.warning("expiry sweep failed: %s", exc)
            return 0
        self.deleted_total += deleted
        return deleted

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.run_once()
