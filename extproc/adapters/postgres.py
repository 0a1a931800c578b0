"""PostgreSQL adapter: the connection pool, the prefix index and the expiry sweeper.

Every call is bounded by a client-side deadline as well as the server's statement timeout, and
every psycopg error (or a missed deadline) becomes ``DependencyError`` here, in one place.
Index lookups and commits are tried once more, inside the same deadline, when the first try
failed for the connection (severed, refused, the server shutting down, the pool still
reconnecting), never for a logical error (a statement timeout, a constraint, bad data). Before
that second try the pool checks its idle connections, since one dead connection (a restarted
or failed-over server) usually means they are all dead.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeAlias, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from extproc.core.errors import DependencyError
from extproc.core.model import CacheEntry, IndexHit, PendingWrite, PrefixHash, Scope, Tier

Pool: TypeAlias = AsyncConnectionPool[AsyncConnection[TupleRow]]
T = TypeVar("T")

_log = logging.getLogger(__name__)

# Work abandoned at its deadline keeps running until psycopg gives up on it; hold a reference.
_abandoned: set[asyncio.Task[object]] = set()


def describe(exc: BaseException) -> str:
    """A one-line, secret-free description of a database error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) or type(exc).__name__


async def bounded(work: Awaitable[T], limit: float, what: str) -> T:
    """Await ``work`` for at most ``limit`` seconds; map failures to ``DependencyError``.

    On the deadline the work is cancelled but not awaited: psycopg may need a while to give up
    on a dead connection, and the caller must not wait for it.
    """
    task: asyncio.Task[T] = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=limit)
    except asyncio.CancelledError:
        _abandon(task)
        raise
    if not done:
        _abandon(task)
        raise DependencyError(f"{what}: no answer within {limit:g}s")
    try:
        return task.result()
    except psycopg.Error as exc:
        raise DependencyError(f"{what}: {describe(exc)}") from exc


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
        _log.warning("%s: connection failed (%s), trying once more", what, describe(exc))
    if before_retry is not None:
        await before_retry()
    return await attempt()


def _abandon(task: asyncio.Task[T]) -> None:
    task.cancel()
    _abandoned.add(task)
    task.add_done_callback(_forget)


def _forget(task: asyncio.Task[T]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not report it


async def open_pool(
    url: str,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 5.0,  # noqa: ASYNC109 (the pool's wait for a connection)
    *,
    statement_timeout: float = 2.0,
) -> Pool:
    """An open pool of autocommit connections; an empty ``url`` means libpq's ``PG*`` env vars."""

    async def configure(conn: AsyncConnection[TupleRow]) -> None:
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


_LOOKUP = """
SELECT prefix_hash, cumulative_token_count, ttl_tier
FROM prompt_cache_entries
WHERE principal_id = %s AND virtual_model = %s AND tokenizer_version = %s
  AND prefix_hash = ANY(%s) AND expires_at > now()
"""

# New entries and the refreshed read in one statement (so one round trip, atomically). A
# refreshed entry is re-inserted if the sweeper removed it meanwhile: the response charged it
# as a read, so it stays live for its tier from now, like any entry that was just used.
_UPSERT = """
INSERT INTO prompt_cache_entries AS e (principal_id, virtual_model, tokenizer_version,
    prefix_hash, cumulative_token_count, ttl_tier, created_at, expires_at)
SELECT %s, %s, %s, w.hash, w.tokens, w.tier, now(), now() + w.seconds * interval '1 second'
FROM unnest(%s::bytea[], %s::integer[], %s::text[], %s::integer[]) AS w(hash, tokens, tier, seconds)
ON CONFLICT (principal_id, virtual_model, tokenizer_version, prefix_hash) DO UPDATE
SET cumulative_token_count = EXCLUDED.cumulative_token_count,
    ttl_tier = EXCLUDED.ttl_tier,
    expires_at = EXCLUDED.expires_at
"""


class PgPrefixIndex:
    """The prefix index in ``prompt_cache_entries``; implements ``ports.PrefixIndex``."""

    def __init__(self, pool: Pool, *, timeout: float = 1.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def lookup(self, scope: Scope, hashes: Sequence[PrefixHash]) -> Sequence[IndexHit]:
        if not hashes:
            return []
        work = once_more_on_connection_error(
            lambda: self._select(scope, list(hashes)), "index lookup", self._pool.check
        )
        rows = await bounded(work, self._timeout, "index lookup")
        return [IndexHit(PrefixHash(bytes(h)), n, Tier(t)) for h, n, t in rows]

    async def _select(self, scope: Scope, hashes: list[PrefixHash]) -> list[TupleRow]:
        params = (scope.principal_id, scope.virtual_model, scope.tokenizer_version, hashes)
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_LOOKUP, params)
            return await cursor.fetchall()

    async def commit(self, pending: PendingWrite) -> None:
        entries = _entries_to_write(pending)
        if entries:
            work = once_more_on_connection_error(
                lambda: self._upsert(pending.scope, entries), "index commit", self._pool.check
            )
            await bounded(work, self._timeout, "index commit")

    async def _upsert(self, scope: Scope, entries: Sequence[CacheEntry]) -> None:
        params = (
            scope.principal_id,
            scope.virtual_model,
            scope.tokenizer_version,
            [e.prefix_hash for e in entries],
            [e.cumulative_token_count for e in entries],
            [e.tier.value for e in entries],
            [e.tier.seconds for e in entries],
        )
        async with self._pool.connection() as conn:
            await conn.execute(_UPSERT, params)


def _entries_to_write(pending: PendingWrite) -> list[CacheEntry]:
    """The new entries plus the refreshed read, one per hash (a new entry wins)."""
    by_hash: dict[bytes, CacheEntry] = {}
    if pending.refresh is not None:
        hit = pending.refresh
        by_hash[hit.prefix_hash] = CacheEntry(hit.prefix_hash, hit.cumulative_token_count, hit.tier)
    for entry in pending.entries:
        by_hash[entry.prefix_hash] = entry
    return list(by_hash.values())


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
    total = 0
    while True:
        deleted = await bounded(_sweep_batch(pool, batch_size), deadline, "expiry sweep")
        total += deleted
        if deleted < batch_size:
            return total


async def _sweep_batch(pool: Pool, batch_size: int) -> int:
    async with pool.connection() as conn:
        cursor = await conn.execute(_SWEEP, (batch_size,))
        return cursor.rowcount


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
