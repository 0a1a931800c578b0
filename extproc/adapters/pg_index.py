"""The prefix index in PostgreSQL's ``prompt_cache_entries``, with its memory in front.

Rules:
* a lookup is answered from ``IndexMemo`` when its rules allow, else in one round trip that
  also says how long each hit has left; every hit read from PostgreSQL is remembered;
* a commit writes the new entries and, unless the memo says it can wait, the refreshed read,
  in one upsert (so atomically); a commit left with nothing to write makes no round trip;
* concurrent commits are coalesced: up to 64 of them become one statement, at most two such
  statements in flight (``Batcher``); what a commit wrote is remembered once it succeeded;
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

_LOOKUP = """
SELECT q.n, e.cumulative_token_count, e.ttl_tier,
       extract(epoch FROM e.expires_at - now())::float8
FROM unnest(%b::bytea[]) WITH ORDINALITY AS q(prefix_hash, n)
JOIN prompt_cache_entries e ON e.prefix_hash = q.prefix_hash
WHERE e.principal_id = %b AND e.virtual_model = %b AND e.tokenizer_version = %b
  AND e.expires_at > now()
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

COMMIT_BATCH = 64
COMMIT_FLUSHERS = 2


@dataclass(frozen=True, slots=True)
class _Write:
    """One commit's rows."""

    scope: Scope
    entries: tuple[CacheEntry, ...]


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
        self._commits: Batcher[_Write] = Batcher(
            "index commit", self._upsert, flushers=COMMIT_FLUSHERS, max_batch=COMMIT_BATCH
        )

    @property
    def commit_batches(self) -> tuple[int, int]:
        """Statements the coalesced commits needed so far, and the commits they carried."""
        return self._commits.batches, self._commits.items

    async def lookup(self, scope: Scope, hashes: Sequence[PrefixHash]) -> Sequence[IndexHit]:
        if not hashes:
            return []
        known = self.memo.answer(scope, hashes)
        if known is not None:
            return [known]
        sent_at = self.memo.clock()
        with self._timed("lookup"):
            rows = await through(self._breaker, lambda: self._select(scope, hashes))
        hits = []
        for number, tokens, tier, left in rows:
            hit = IndexHit(hashes[number - 1], tokens, Tier(tier))
            self.memo.learn(scope, hit, sent_at + left, sent_at)
            hits.append(hit)
        return hits

    async def _select(
        self, scope: Scope, hashes: Sequence[PrefixHash]
    ) -> list[tuple[int, int, str, float]]:
        params = (list(hashes), scope.principal_id, scope.virtual_model, scope.tokenizer_version)

        async def select(conn: Connection) -> list[tuple[int, int, str, float]]:
            cursor = await conn.execute(_LOOKUP, params)
            return await cursor.fetchall()

        return await self._db.run("index lookup", self._timeout, select)

    async def commit(self, pending: PendingWrite) -> None:
        entries = self._entries_to_write(pending)
        if not entries:
            return
        write = _Write(pending.scope, entries)
        sent_at = self.memo.clock()
        await through(self._breaker, lambda: self._commits.submit(write, self._timeout))
        self.memo.wrote(pending.scope, entries, sent_at)

    async def aclose(self) -> None:
        """Stop coalescing commits (call after the pending ones were drained)."""
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

    async def _upsert(self, writes: Sequence[_Write]) -> None:
        params = _upsert_params(writes)

        async def upsert(conn: Connection) -> None:
            await conn.execute(_UPSERT, params)

        await self._db.run("index commit", self._timeout, upsert)


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
