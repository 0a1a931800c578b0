"""The prefix index in PostgreSQL's ``prompt_cache_entries``, with its memory in front.

Rules:
* a lookup is answered from ``IndexMemo`` when its rules allow, else by PostgreSQL, which also
  says how long each hit has left; every hit read from PostgreSQL is remembered;
* a commit writes the new entries and, unless the memo says it can wait, the refreshed read,
  in one upsert (so atomically); a commit left with nothing to write makes no round trip;
* concurrent lookups, and concurrent commits, are coalesced (``Batcher``): up to 64 become one
  statement, at most two statements of each kind in flight; what a commit wrote is
  remembered once it succeeded;
* lookups and commits go through the database's breaker, when there is one, and fail at once
  while it is open (a hit in memory is still served);
* hashes and counts travel as binary parameters (no text escaping of ``bytea``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from extproc.adapters.batcher import Batcher
from extproc.adapters.breaker import Breaker, through
from extproc.adapters.index_memo import IndexMemo
from extproc.adapters.postgres import Connection, Database, Pool
from extproc.core.model import CacheEntry, IndexHit, PendingWrite, PrefixHash, Scope, Tier

Timed = Callable[[str], AbstractContextManager[None]]

# One lookup's candidates: ``n`` numbers the hashes.
_LOOKUP_ONE = """
SELECT q.n, e.cumulative_token_count, e.ttl_tier,
       extract(epoch FROM e.expires_at - now())::float8
FROM unnest(%b::bytea[]) WITH ORDINALITY AS q(prefix_hash, n)
JOIN prompt_cache_entries e ON e.prefix_hash = q.prefix_hash
WHERE e.principal_id = %b AND e.virtual_model = %b AND e.tokenizer_version = %b
  AND e.expires_at > now()
"""

# The candidates of many lookups in one statement: row ``n`` of the hashes belongs to lookup
# ``item``, whose scope is row ``item`` of the scopes.
# Each candidate probes the unique index on its own (LATERAL), whatever the table's size.
_LOOKUP = """
SELECT q.n, e.cumulative_token_count, e.ttl_tier,
       extract(epoch FROM e.expires_at - now())::float8
FROM unnest(%b::int4[], %b::bytea[]) WITH ORDINALITY AS q(item, prefix_hash, n)
JOIN unnest(%b::text[], %b::text[], %b::text[]) WITH ORDINALITY
    AS s(principal_id, virtual_model, tokenizer_version, item) ON s.item = q.item
CROSS JOIN LATERAL (
    SELECT x.cumulative_token_count, x.ttl_tier, x.expires_at
    FROM prompt_cache_entries x
    WHERE x.principal_id = s.principal_id AND x.virtual_model = s.virtual_model
      AND x.tokenizer_version = s.tokenizer_version AND x.prefix_hash = q.prefix_hash
      AND x.expires_at > now()
) e
"""

# New entries and refreshed reads of many commits in one statement. A refreshed entry is
# re-inserted if the sweeper removed it meanwhile: the response charged it as a read, so it
# stays live for its tier from now, like any entry that was just used.
_UPSERT = """
INSERT INTO prompt_cache_entries AS e (principal_id, virtual_model, tokenizer_version,
    prefix_hash, cumulative_token_count, ttl_tier, created_at, expires_at)
SELECT w.principal_id, w.virtual_model, w.tokenizer_version, w.prefix_hash, w.tokens, w.tier,
    now(), now() + w.seconds * interval '1 second'
FROM unnest(%b::text[], %b::text[], %b::text[], %b::bytea[], %b::int4[], %b::text[], %b::int4[])
    AS w(principal_id, virtual_model, tokenizer_version, prefix_hash, tokens, tier, seconds)
ON CONFLICT (principal_id, virtual_model, tokenizer_version, prefix_hash) DO UPDATE
SET cumulative_token_count = EXCLUDED.cumulative_token_count,
    ttl_tier = EXCLUDED.ttl_tier,
    expires_at = EXCLUDED.expires_at
"""

BATCH = 64
FLUSHERS = 2


@dataclass(frozen=True, slots=True)
class _Write:
    """One commit's rows."""

    scope: Scope
    entries: tuple[CacheEntry, ...]


@dataclass(frozen=True, slots=True)
class _Lookup:
    """One lookup's candidates."""

    scope: Scope
    hashes: Sequence[PrefixHash]


# A hit as the lookup statement reports it: the candidate, its count, tier and seconds left.
_Row = tuple[PrefixHash, int, str, float]


def _untimed(_name: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


class PgPrefixIndex:
    """The prefix index (a ``ports.PrefixIndex``); see the module docstring for the rules."""

    def __init__(
        self,
        pool: Pool,
        *,
        timeout: float = 1.0,
        memo: IndexMemo | None = None,
        breaker: Breaker | None = None,
        timed: Timed = _untimed,
    ) -> None:
        self._db = Database(pool)
        self._timeout = timeout
        self.memo = memo or IndexMemo()
        self._breaker = breaker
        self._timed = timed
        self._lookups: Batcher[_Lookup, list[_Row]] = Batcher(
            "index lookup", self._select, flushers=FLUSHERS, max_batch=BATCH
        )
        self._commits: Batcher[_Write, None] = Batcher(
            "index commit", self._upsert, flushers=FLUSHERS, max_batch=BATCH
        )

    @property
    def commit_batches(self) -> tuple[int, int]:
        """Statements the coalesced commits needed so far, and the commits they carried."""
        return self._commits.batches, self._commits.items

    @property
    def lookup_batches(self) -> tuple[int, int]:
        """Statements the coalesced lookups needed so far, and the lookups they carried."""
        return self._lookups.batches, self._lookups.items

    async def lookup(self, scope: Scope, hashes: Sequence[PrefixHash]) -> Sequence[IndexHit]:
        if not hashes:
            return []
        known = self.memo.answer(scope, hashes)
        if known is not None:
            return [known]
        sent_at = self.memo.clock()
        lookup = _Lookup(scope, hashes)
        with self._timed("lookup"):
            rows = await through(self._breaker, lambda: self._lookups.submit(lookup, self._timeout))
        hits = []
        for prefix_hash, tokens, tier, left in rows:
            hit = IndexHit(prefix_hash, tokens, Tier(tier))
            self.memo.learn(scope, hit, sent_at + left, sent_at)
            hits.append(hit)
        return hits

    async def _select(self, lookups: Sequence[_Lookup]) -> list[list[_Row]]:
        items: list[int] = []
        hashes: list[PrefixHash] = []
        for number, lookup in enumerate(lookups, start=1):
            items += [number] * len(lookup.hashes)
            hashes += lookup.hashes
        sql, params = _lookup_statement(lookups, items, hashes)

        async def select(conn: Connection) -> list[tuple[int, int, str, float]]:
            cursor = await conn.execute(sql, params)
            return await cursor.fetchall()

        found: list[list[_Row]] = [[] for _ in lookups]
        for n, tokens, tier, left in await self._db.run("index lookup", self._timeout, select):
            found[items[n - 1] - 1].append((hashes[n - 1], tokens, tier, left))
        return found

    def due(self, pending: PendingWrite) -> bool:
        if pending.entries:
            return True
        hit = pending.refresh
        if hit is None:
            return False
        if self.memo.refresh_due(pending.scope, hit):
            return True
        self.memo.skipped_refresh()
        return False

    async def commit(self, pending: PendingWrite) -> None:
        entries = self._entries_to_write(pending)
        if not entries:
            return
        write = _Write(pending.scope, entries)
        sent_at = self.memo.clock()
        await through(self._breaker, lambda: self._commits.submit(write, self._timeout))
        self.memo.wrote(pending.scope, entries, sent_at)

    async def aclose(self) -> None:
        """Stop coalescing (call after the pending commits were drained)."""
        await self._lookups.aclose()
        await self._commits.aclose()

    def _entries_to_write(self, pending: PendingWrite) -> tuple[CacheEntry, ...]:
        """The new entries plus the refreshed read when it is due, one per hash."""
        by_hash: dict[bytes, CacheEntry] = {}
        hit = pending.refresh
        if hit is not None and self.memo.needs_refresh(pending.scope, hit):
            by_hash[hit.prefix_hash] = CacheEntry(
                hit.prefix_hash, hit.cumulative_token_count, hit.tier
            )
        for entry in pending.entries:
            by_hash[entry.prefix_hash] = entry
        return tuple(by_hash.values())

    async def _upsert(self, writes: Sequence[_Write]) -> list[None]:
        params = _upsert_params(writes)

        async def upsert(conn: Connection) -> None:
            await conn.execute(_UPSERT, params)

        await self._db.run("index commit", self._timeout, upsert)
        return [None] * len(writes)


def _lookup_statement(
    lookups: Sequence[_Lookup], items: list[int], hashes: list[PrefixHash]
) -> tuple[str, tuple[object, ...]]:
    """The statement for a batch: one lookup's is simpler (fewer arrays to send)."""
    if len(lookups) == 1:
        scope = lookups[0].scope
        return _LOOKUP_ONE, (
            hashes,
            scope.principal_id,
            scope.virtual_model,
            scope.tokenizer_version,
        )
    return _LOOKUP, (items, hashes, *_scope_columns([lookup.scope for lookup in lookups]))


def _scope_columns(scopes: Sequence[Scope]) -> tuple[list[str], list[str], list[str]]:
    """The principal, model and tokenizer version arrays of ``scopes``."""
    return (
        [scope.principal_id for scope in scopes],
        [scope.virtual_model for scope in scopes],
        [scope.tokenizer_version for scope in scopes],
    )


def _upsert_params(writes: Sequence[_Write]) -> tuple[list[object], ...]:
    """Column arrays of every row, one row per scope and hash (the latest commit wins)."""
    rows: dict[tuple[Scope, bytes], CacheEntry] = {}
    for write in writes:
        for entry in write.entries:
            rows[(write.scope, entry.prefix_hash)] = entry
    columns: tuple[list[object], ...] = ([], [], [], [], [], [], [])
    for (scope, _hash), entry in rows.items():
        values = (
            scope.principal_id,
            scope.virtual_model,
            scope.tokenizer_version,
            entry.prefix_hash,
            entry.cumulative_token_count,
            entry.tier.value,
            entry.tier.seconds,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return columns
