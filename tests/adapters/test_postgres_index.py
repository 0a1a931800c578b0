"""The PostgreSQL prefix index and expiry sweeper against a real server."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import psycopg_pool
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from extproc.adapters.index_memo import IndexMemo, MemoPolicy
from extproc.adapters.pg_index import PgPrefixIndex
from extproc.adapters.postgres import (
    ExpirySweeper,
    Pool,
    is_connection_error,
    once_more_on_connection_error,
    open_pool,
    sweep_expired,
)
from extproc.core.errors import DependencyError
from extproc.core.model import (
    CacheEntry,
    IndexHit,
    PendingWrite,
    PrefixHash,
    PrincipalId,
    Scope,
    Tier,
)
from tests.fakes.tcp_proxy import TcpProxy

SCOPE = Scope(PrincipalId("tenant-a"), "model-x", "tok-1")


def h(label: str) -> PrefixHash:
    return PrefixHash(hashlib.sha256(label.encode()).digest())


def insert(url: str, scope: Scope, label: str, tokens: int, expires_in: str) -> None:
    """Insert an entry directly, with an expiry relative to now (e.g. ``'-1 second'``)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO prompt_cache_entries (principal_id, virtual_model, tokenizer_version,"
            " prefix_hash, cumulative_token_count, ttl_tier, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, '5m', now() + %s::interval)",
            (*_scope(scope), h(label), tokens, expires_in),
        )


def _scope(scope: Scope) -> tuple[str, str, str]:
    return (scope.principal_id, scope.virtual_model, scope.tokenizer_version)


def seconds_left(url: str, label: str) -> float:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM expires_at - now())::float FROM prompt_cache_entries"
            " WHERE prefix_hash = %s",
            (h(label),),
        ).fetchone()
    assert row is not None
    return float(row[0])


def count_rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM prompt_cache_entries").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
async def index(pg_pool: Pool) -> AsyncIterator[PgPrefixIndex]:
    """The index with its memory never answering: every lookup asks PostgreSQL."""
    index = PgPrefixIndex(pg_pool, timeout=5.0, memo=IndexMemo(MemoPolicy(ttl=0.0)))
    yield index
    await index.aclose()


OTHER_SCOPES = [
    pytest.param(Scope(PrincipalId("tenant-b"), "model-x", "tok-1"), id="other-principal"),
    pytest.param(Scope(PrincipalId("tenant-a"), "model-y", "tok-1"), id="other-model"),
    pytest.param(Scope(PrincipalId("tenant-a"), "model-x", "tok-2"), id="other-tokenizer"),
]


@pytest.mark.parametrize("other", OTHER_SCOPES)
async def test_lookup_never_crosses_scopes(
    index: PgPrefixIndex, database_url: str, other: Scope
) -> None:
    insert(database_url, other, "p0", 100, "5 minutes")
    assert await index.lookup(SCOPE, [h("p0")]) == []
    assert await index.lookup(other, [h("p0")]) == [IndexHit(h("p0"), 100, Tier.M5)]


async def test_lookup_returns_only_live_entries(index: PgPrefixIndex, database_url: str) -> None:
    insert(database_url, SCOPE, "live", 10, "5 minutes")
    insert(database_url, SCOPE, "expired", 20, "-1 second")
    hits = await index.lookup(SCOPE, [h("live"), h("expired"), h("absent")])
    assert hits == [IndexHit(h("live"), 10, Tier.M5)]


async def test_lookup_of_nothing_is_empty(index: PgPrefixIndex) -> None:
    assert await index.lookup(SCOPE, []) == []


async def test_commit_inserts_entries_with_their_tiers(index: PgPrefixIndex) -> None:
    entries = (CacheEntry(h("a"), 1000, Tier.M5), CacheEntry(h("b"), 3000, Tier.H1))
    await index.commit(PendingWrite(SCOPE, entries, None))
    hits = await index.lookup(SCOPE, [h("a"), h("b")])
    assert sorted(hits, key=lambda hit: hit.cumulative_token_count) == [
        IndexHit(h("a"), 1000, Tier.M5),
        IndexHit(h("b"), 3000, Tier.H1),
    ]


async def test_commit_upserts_an_existing_entry(index: PgPrefixIndex, database_url: str) -> None:
    insert(database_url, SCOPE, "a", 10, "-1 minute")
    await index.commit(PendingWrite(SCOPE, (CacheEntry(h("a"), 1024, Tier.H24),), None))
    assert await index.lookup(SCOPE, [h("a")]) == [IndexHit(h("a"), 1024, Tier.H24)]
    assert seconds_left(database_url, "a") > 3600


async def test_refresh_slides_the_expiry_of_the_read(
    index: PgPrefixIndex, database_url: str
) -> None:
    insert(database_url, SCOPE, "read", 500, "10 seconds")
    hit = IndexHit(h("read"), 500, Tier.H1)
    await index.commit(PendingWrite(SCOPE, (CacheEntry(h("new"), 900, Tier.M5),), hit))
    assert seconds_left(database_url, "read") > 3000
    assert 0 < seconds_left(database_url, "new") <= 300


async def test_refresh_re_lives_an_entry_swept_meanwhile(index: PgPrefixIndex) -> None:
    hit = IndexHit(h("gone"), 700, Tier.M5)
    await index.commit(PendingWrite(SCOPE, (), hit))
    assert await index.lookup(SCOPE, [h("gone")]) == [hit]


async def test_sweep_deletes_only_expired_rows(pg_pool: Pool, database_url: str) -> None:
    for i in range(7):
        insert(database_url, SCOPE, f"old{i}", i, "-1 second")
    insert(database_url, SCOPE, "live", 1, "1 hour")
    assert await sweep_expired(pg_pool, batch_size=3) == 7
    assert count_rows(database_url) == 1


async def test_concurrent_sweepers_share_the_work(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO prompt_cache_entries (principal_id, virtual_model, tokenizer_version,"
            " prefix_hash, cumulative_token_count, ttl_tier, expires_at)"
            " SELECT 'p', 'm', 'v', sha256(i::text::bytea), i, '5m',"
            " now() + CASE WHEN i % 4 = 0 THEN interval '1 hour' ELSE interval '-1 hour' END"
            " FROM generate_series(1, 2000) AS i"
        )
    pool = await open_pool(database_url, min_size=4, max_size=4, timeout=10.0)
    try:
        counts = await asyncio.gather(*(sweep_expired(pool, batch_size=50) for _ in range(4)))
    finally:
        await pool.close()
    assert sum(counts) == 1500
    assert count_rows(database_url) == 500


@pytest.fixture
async def proxied_index(proxied_pool: Pool) -> AsyncIterator[PgPrefixIndex]:
    index = PgPrefixIndex(proxied_pool, timeout=0.5, memo=IndexMemo(MemoPolicy(ttl=0.0)))
    yield index
    await index.aclose()


async def test_a_severed_connection_is_tried_once_more(
    proxied_index: PgPrefixIndex, pg_proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    pending = PendingWrite(SCOPE, (CacheEntry(h("a"), 7, Tier.M5),), None)
    assert await proxied_index.lookup(SCOPE, [h("a")]) == []
    await pg_proxy.cut()
    await proxied_index.commit(pending)  # the pool's connection died: a new one does it
    await pg_proxy.cut()
    assert await proxied_index.lookup(SCOPE, [h("a")]) == [IndexHit(h("a"), 7, Tier.M5)]
    retried = [r.getMessage() for r in caplog.records if "trying once more" in r.getMessage()]
    assert [m.split(":")[0] for m in retried] == ["index commit", "index lookup"]


async def test_connections_that_keep_failing_raise_dependency_error(
    proxied_index: PgPrefixIndex, pg_proxy: TcpProxy
) -> None:
    assert await proxied_index.lookup(SCOPE, [h("a")]) == []
    await pg_proxy.cut()
    await pg_proxy.stop()
    with pytest.raises(DependencyError):
        await proxied_index.lookup(SCOPE, [h("a")])


def _failing(errors: list[Exception]) -> tuple[list[int], Callable[[], Awaitable[str]]]:
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "ok"

    return calls, attempt


CONNECTION_CLASS = [
    pytest.param(psycopg.OperationalError("server closed the connection"), id="severed"),
    pytest.param(psycopg.InterfaceError("the connection is closed"), id="closed"),
    pytest.param(psycopg_pool.PoolTimeout("couldn't get a connection"), id="pool-reconnecting"),
    pytest.param(psycopg.errors.AdminShutdown("terminating connection"), id="admin-shutdown"),
    pytest.param(psycopg.errors.ConnectionFailure("connection failure"), id="class-08"),
]
LOGICAL = [
    pytest.param(psycopg.errors.QueryCanceled("statement timeout"), id="statement-timeout"),
    pytest.param(psycopg.errors.UniqueViolation("duplicate key"), id="constraint"),
    pytest.param(psycopg.errors.InvalidTextRepresentation("bad input"), id="bad-data"),
    pytest.param(psycopg.errors.UndefinedTable("no such table"), id="schema"),
]


@pytest.mark.parametrize("error", CONNECTION_CLASS)
async def test_connection_class_errors_get_one_more_try(error: Exception) -> None:
    assert is_connection_error(error)
    calls, attempt = _failing([error])
    assert await once_more_on_connection_error(attempt, "lookup") == "ok"
    assert len(calls) == 2
    calls, attempt = _failing([error, error])
    with pytest.raises(type(error)):
        await once_more_on_connection_error(attempt, "lookup")
    assert len(calls) == 2  # once more, not more


@pytest.mark.parametrize("error", LOGICAL)
async def test_logical_errors_are_never_retried(error: Exception) -> None:
    assert not is_connection_error(error)
    calls, attempt = _failing([error])
    with pytest.raises(type(error)):
        await once_more_on_connection_error(attempt, "lookup")
    assert len(calls) == 1


async def test_stopped_server_raises_dependency_error(
    proxied_index: PgPrefixIndex, pg_proxy: TcpProxy
) -> None:
    await pg_proxy.stop()
    with pytest.raises(DependencyError):
        await proxied_index.commit(PendingWrite(SCOPE, (CacheEntry(h("a"), 1, Tier.M5),), None))


async def test_stalled_server_raises_dependency_error_at_the_deadline(
    proxied_index: PgPrefixIndex, pg_proxy: TcpProxy
) -> None:
    pg_proxy.stall()
    with pytest.raises(DependencyError, match="no answer"):
        await proxied_index.lookup(SCOPE, [h("a")])
    pg_proxy.resume()


async def test_index_recovers_after_an_outage(
    proxied_index: PgPrefixIndex, pg_proxy: TcpProxy
) -> None:
    await pg_proxy.stop()
    with pytest.raises(DependencyError):
        await proxied_index.lookup(SCOPE, [h("a")])
    await pg_proxy.start()
    assert await _lookup_once_recovered(proxied_index) == []


async def _lookup_once_recovered(index: PgPrefixIndex) -> list[IndexHit]:
    """Retry while the pool replaces its broken connections; fail if it never recovers."""
    for _ in range(50):
        try:
            return list(await index.lookup(SCOPE, [h("a")]))
        except DependencyError:
            await asyncio.sleep(0.1)
    pytest.fail("the index never recovered after the server came back")


async def test_periodic_sweeper_counts_deletions_and_stops(
    pg_pool: Pool, database_url: str
) -> None:
    insert(database_url, SCOPE, "old", 1, "-1 second")
    sweeper = ExpirySweeper(pg_pool, interval=3600.0, batch_size=10)
    sweeper.start()
    assert await sweeper.run_once() == 1
    await sweeper.stop()
    await sweeper.stop()
    assert (sweeper.deleted_total, sweeper.failures, count_rows(database_url)) == (1, 0, 0)


async def test_periodic_sweeper_survives_an_outage(database_url: str, pg_proxy: TcpProxy) -> None:
    url = make_conninfo(database_url, host="127.0.0.1", port=pg_proxy.port)
    pool = await open_pool(url, min_size=1, max_size=1, timeout=1.0)
    try:
        await pg_proxy.stop()
        sweeper = ExpirySweeper(pool)
        assert await sweeper.run_once() == 0
        assert sweeper.failures == 1
    finally:
        await pool.close(timeout=1.0)


async def test_open_pool_on_an_unreachable_server_raises_dependency_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DependencyError, match="database unavailable"):
        await open_pool(f"postgresql://nobody@127.0.0.1:{port}/none", timeout=1.0)


async def test_open_pool_with_empty_url_uses_libpq_environment(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = conninfo_to_dict(database_url)
    for name, key in (("PGHOST", "host"), ("PGPORT", "port"), ("PGUSER", "user")):
        monkeypatch.setenv(name, str(params[key]))
    monkeypatch.setenv("PGDATABASE", str(params["dbname"]))
    pool = await open_pool("", timeout=5.0)
    try:
        async with pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT current_database(), current_setting('statement_timeout')"
            )
            assert await cursor.fetchone() == (params["dbname"], "2s")
    finally:
        await pool.close()
