"""The prefix index's memory, refresh debounce, coalesced commits and breaker, on a real server.

Outages go through the stoppable proxy; clocks that decide a memo or a breaker are fake, so
nothing here waits for time to pass except the 0.5 s deadlines of lookups into a stall.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psycopg
import pytest

from extproc.adapters.breaker import Breaker, BreakerPolicy, BreakerState, CircuitOpen
from extproc.adapters.index_memo import IndexMemo, MemoPolicy
from extproc.adapters.pg_index import PgPrefixIndex
from extproc.adapters.postgres import Pool
from extproc.core.errors import DependencyError
from extproc.core.model import CacheEntry, IndexHit, PendingWrite, PrincipalId, Scope, Tier
from tests.adapters.test_postgres_index import SCOPE, h, insert, seconds_left
from tests.fakes.tcp_proxy import TcpProxy


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def memo(ttl: float = 60.0, clock: Clock | None = None) -> IndexMemo:
    return IndexMemo(MemoPolicy(ttl=ttl), clock or Clock())


_OPENED: list[PgPrefixIndex] = []


def index(pool: Pool, memo: IndexMemo, breaker: Breaker | None = None) -> PgPrefixIndex:
    """An index with 0.5 s deadlines, closed when the test ends."""
    opened = PgPrefixIndex(pool, timeout=0.5, memo=memo, breaker=breaker)
    _OPENED.append(opened)
    return opened


@pytest.fixture(autouse=True)
async def _close_indexes() -> AsyncIterator[None]:
    yield
    while _OPENED:
        await _OPENED.pop().aclose()


def purge(url: str) -> None:
    """What ``extproc cache purge`` does: delete the rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM prompt_cache_entries")


HIT = IndexHit(h("p0"), 100, Tier.M5)


async def test_a_repeated_hit_is_served_from_memory(
    proxied_pool: Pool, database_url: str, pg_proxy: TcpProxy
) -> None:
    idx = index(proxied_pool, memo())
    insert(database_url, SCOPE, "p0", 100, "5 minutes")
    assert await idx.lookup(SCOPE, [h("p0"), h("before")]) == [HIT]
    await pg_proxy.stop()
    assert await idx.lookup(SCOPE, [h("p0"), h("before")]) == [HIT]
    assert idx.memo.stats().hits == 1


async def test_a_miss_always_asks_the_database(
    proxied_pool: Pool, database_url: str, pg_proxy: TcpProxy
) -> None:
    idx = index(proxied_pool, memo())
    assert await idx.lookup(SCOPE, [h("p0")]) == []
    insert(database_url, SCOPE, "p0", 100, "5 minutes")  # another replica wrote it
    assert await idx.lookup(SCOPE, [h("p0")]) == [HIT]
    await pg_proxy.stop()
    with pytest.raises(DependencyError):
        await idx.lookup(SCOPE, [h("p1"), h("p0")])  # the deepest candidate is unknown


async def test_a_deeper_entry_another_replica_wrote_is_found(
    proxied_pool: Pool, database_url: str
) -> None:
    idx = index(proxied_pool, memo())
    insert(database_url, SCOPE, "shallow", 100, "5 minutes")
    assert await idx.lookup(SCOPE, [h("shallow")]) == [IndexHit(h("shallow"), 100, Tier.M5)]
    insert(database_url, SCOPE, "deep", 300, "5 minutes")
    hits = await idx.lookup(SCOPE, [h("deep"), h("shallow")])
    assert IndexHit(h("deep"), 300, Tier.M5) in hits


async def test_memory_never_crosses_scopes(proxied_pool: Pool, database_url: str) -> None:
    idx = index(proxied_pool, memo())
    other = Scope(PrincipalId("tenant-b"), SCOPE.virtual_model, SCOPE.tokenizer_version)
    insert(database_url, SCOPE, "p0", 100, "5 minutes")
    assert await idx.lookup(SCOPE, [h("p0")]) == [HIT]
    assert await idx.lookup(other, [h("p0")]) == []


async def test_a_purge_lands_within_the_memo_ttl(proxied_pool: Pool, database_url: str) -> None:
    clock = Clock()
    idx = index(proxied_pool, memo(ttl=2.0, clock=clock))
    insert(database_url, SCOPE, "p0", 100, "5 minutes")
    assert await idx.lookup(SCOPE, [h("p0")]) == [HIT]
    purge(database_url)
    clock.now += 1.9
    assert await idx.lookup(SCOPE, [h("p0")]) == [HIT]
    clock.now += 0.1
    assert await idx.lookup(SCOPE, [h("p0")]) == []


async def test_memory_never_outlives_the_entry(proxied_pool: Pool, database_url: str) -> None:
    clock = Clock()
    idx = index(proxied_pool, memo(ttl=60.0, clock=clock))
    insert(database_url, SCOPE, "p0", 100, "10 seconds")
    assert await idx.lookup(SCOPE, [h("p0")]) == [HIT]
    purge(database_url)  # so that asking PostgreSQL shows
    clock.now += 8.0
    assert await idx.lookup(SCOPE, [h("p0")]) == [HIT]
    clock.now += 1.0  # less than the 1 s margin left before the expiry PostgreSQL reported
    assert await idx.lookup(SCOPE, [h("p0")]) == []


async def test_what_a_commit_wrote_is_served_from_memory(
    proxied_pool: Pool, pg_proxy: TcpProxy
) -> None:
    idx = index(proxied_pool, memo())
    await idx.commit(PendingWrite(SCOPE, (CacheEntry(h("p0"), 100, Tier.M5),), None))
    await pg_proxy.stop()
    assert await idx.lookup(SCOPE, [h("p0")]) == [HIT]


async def test_a_read_with_most_of_its_tier_left_commits_nothing(
    proxied_pool: Pool, database_url: str, pg_proxy: TcpProxy
) -> None:
    idx = index(proxied_pool, memo())
    insert(database_url, SCOPE, "p0", 100, "5 minutes")
    [hit] = await idx.lookup(SCOPE, [h("p0")])
    await pg_proxy.stop()
    await idx.commit(PendingWrite(SCOPE, (), hit))  # no round trip, so no outage to notice
    assert idx.memo.stats().refreshes_skipped == 1


async def test_a_read_past_the_debounce_is_refreshed(proxied_pool: Pool, database_url: str) -> None:
    idx = index(proxied_pool, memo())
    insert(database_url, SCOPE, "p0", 100, "250 seconds")  # under 90% of the 5m tier left
    [hit] = await idx.lookup(SCOPE, [h("p0")])
    await idx.commit(PendingWrite(SCOPE, (), hit))
    assert seconds_left(database_url, "p0") > 290
    assert idx.memo.stats().refreshes_written == 1


async def test_due_says_whether_a_commit_would_write(proxied_pool: Pool, database_url: str) -> None:
    idx = index(proxied_pool, memo())
    insert(database_url, SCOPE, "fresh", 100, "5 minutes")
    insert(database_url, SCOPE, "aging", 100, "250 seconds")
    hits = {hit.prefix_hash: hit for hit in await idx.lookup(SCOPE, [h("fresh"), h("aging")])}
    fresh, aging = hits[h("fresh")], hits[h("aging")]
    assert not idx.due(PendingWrite(SCOPE, (), fresh))
    assert idx.memo.stats().refreshes_skipped == 1  # counted once, though no commit ran
    assert idx.due(PendingWrite(SCOPE, (), aging))
    assert idx.due(PendingWrite(SCOPE, (CacheEntry(h("new"), 900, Tier.H1),), fresh))
    assert not idx.due(PendingWrite(SCOPE, (), None))
    assert idx.memo.stats().refreshes_skipped == 1


async def test_a_commit_with_new_entries_skips_only_the_refresh(
    proxied_pool: Pool, database_url: str
) -> None:
    idx = index(proxied_pool, memo())
    insert(database_url, SCOPE, "p0", 100, "5 minutes")
    [hit] = await idx.lookup(SCOPE, [h("p0")])
    before = seconds_left(database_url, "p0")
    await idx.commit(PendingWrite(SCOPE, (CacheEntry(h("p1"), 900, Tier.H1),), hit))
    assert seconds_left(database_url, "p0") <= before
    assert 3500 < seconds_left(database_url, "p1") <= 3600


async def test_concurrent_commits_share_one_statement(pg_pool: Pool, database_url: str) -> None:
    idx = index(pg_pool, memo())
    scopes = [Scope(PrincipalId(f"tenant-{i}"), "m", "v") for i in range(20)]
    pending = [
        PendingWrite(s, (CacheEntry(h("p0"), i, Tier.M5),), None) for i, s in enumerate(scopes)
    ]
    await asyncio.gather(*(idx.commit(p) for p in pending))
    assert idx.commit_batches == (1, 20)
    lookups = [await index(pg_pool, memo(ttl=0.0)).lookup(s, [h("p0")]) for s in scopes]
    assert [hits[0].cumulative_token_count for hits in lookups] == list(range(20))


async def test_concurrent_lookups_share_one_statement_and_never_mix_scopes(
    pg_pool: Pool, database_url: str
) -> None:
    idx = index(pg_pool, memo(ttl=0.0))
    scopes = [Scope(PrincipalId(f"tenant-{i}"), "m", "v") for i in range(20)]
    for i, scope in enumerate(scopes):
        if i % 2 == 0:  # the same hash in every other scope, each with its own count
            insert(database_url, scope, "p0", i, "5 minutes")
    found = await asyncio.gather(*(idx.lookup(s, [h("p0"), h("p1")]) for s in scopes))
    assert found == [[IndexHit(h("p0"), i, Tier.M5)] if i % 2 == 0 else [] for i in range(20)]
    assert idx.lookup_batches == (1, 20)


async def test_a_lookup_starts_no_task_of_its_own(proxied_pool: Pool, pg_proxy: TcpProxy) -> None:
    """A stalled lookup waits for a long-lived flusher: no task was started for it."""
    idx = index(proxied_pool, memo())
    assert await idx.lookup(SCOPE, [h("p0")]) == []  # the pool has a working connection
    pg_proxy.stall()
    before = len(asyncio.all_tasks())
    lookup = asyncio.create_task(idx.lookup(SCOPE, [h("p0")]))
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before + 1
    with pytest.raises(DependencyError, match="no answer within"):
        await lookup
    pg_proxy.resume()


async def _until_the_pool_works(pool: Pool) -> None:
    """The pool replaced the connections severed during the outage (polled, bounded)."""
    for _ in range(100):
        try:
            async with pool.connection(timeout=1.0) as conn:
                await conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            await asyncio.sleep(0.1)
    pytest.fail("the pool never reconnected")


async def test_an_outage_costs_a_few_deadlines_then_fails_at_once_and_recovers(
    proxied_pool: Pool, database_url: str, pg_proxy: TcpProxy
) -> None:
    clock = Clock()
    breaker = Breaker("database", BreakerPolicy(failures=2, cooldown_s=5.0), clock)
    idx = index(proxied_pool, memo(ttl=0.0), breaker)
    insert(database_url, SCOPE, "p0", 100, "5 minutes")
    pg_proxy.stall()  # the database freezes
    for _ in range(2):
        with pytest.raises(DependencyError, match="no answer within"):
            await idx.lookup(SCOPE, [h("p0")])
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        await idx.lookup(SCOPE, [h("p0")])
    with pytest.raises(CircuitOpen):
        await idx.commit(PendingWrite(SCOPE, (CacheEntry(h("p1"), 1, Tier.M5),), None))
    pg_proxy.resume()
    await _until_the_pool_works(proxied_pool)
    clock.now += 5.0  # the cooldown is over: the next lookup is the probe
    assert await idx.lookup(SCOPE, [h("p0")]) == [HIT]
    assert breaker.state is BreakerState.CLOSED
