"""Resolvers backed by PostgreSQL: model tariffs and principals, memoised in-process.

Rules:
* memos are bounded (least recently used goes first) and entries expire after a TTL, so an
  operator's change (a tariff, a revoked key) lands within one TTL;
* negative answers (unknown model, unknown key) are memoised like positive ones;
* a memo is keyed by the SHA-256 of a bearer secret, never by the secret;
* failures are not memoised: the next request asks the database again.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from extproc.adapters.postgres import Pool, bounded
from extproc.core.model import Caller, ModelConfig, PrincipalId
from extproc.core.ports import PrincipalResolver
from extproc.principals import HeaderName, PrincipalKind, PrincipalSource

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class MemoStats:
    """Hit and miss counts of a memo (the server exports them as metrics)."""

    hits: int = 0
    misses: int = 0
    size: int = 0


@dataclass(frozen=True, slots=True)
class Memoised(Generic[V]):
    """A memoised answer and when it goes stale (on the memo's clock)."""

    value: V
    stale_at: float


class TtlMemo(Generic[K, V]):
    """A bounded least-recently-used memo whose entries go stale after ``ttl`` seconds."""

    def __init__(self, ttl: float, max_size: int, clock: Clock = time.monotonic) -> None:
        if max_size < 1:
            raise ValueError("a memo needs room for at least one entry")
        self._ttl = ttl
        self._max_size = max_size
        self._clock = clock
        self._items: OrderedDict[K, Memoised[V]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> Memoised[V] | None:
        item = self._items.get(key)
        if item is None or item.stale_at <= self._clock():
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: K, value: V) -> None:
        self._items[key] = Memoised(value, self._clock() + self._ttl)
        self._items.move_to_end(key)
        while len(self._items) > self._max_size:
            self._items.popitem(last=False)

    def stats(self) -> MemoStats:
        return MemoStats(self.hits, self.misses, len(self._items))


_ACTIVE_TARIFF = """
SELECT min_prefix_tokens FROM model_cache_tariffs
WHERE model_alias = %s AND valid_from <= now() AND (valid_until IS NULL OR valid_until > now())
ORDER BY valid_from DESC
LIMIT 1
"""


class PgModelConfigResolver:
    """Cache-enabled models from ``model_cache_tariffs`` (a ``ports.ModelConfigResolver``)."""

    def __init__(
        self,
        pool: Pool,
        *,
        ttl: float = 30.0,
        max_size: int = 1024,
        timeout: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        self._memo: TtlMemo[str, ModelConfig | None] = TtlMemo(ttl, max_size, clock)

    async def model_config(self, alias: str) -> ModelConfig | None:
        memoised = self._memo.get(alias)
        if memoised is not None:
            return memoised.value
        config = await bounded(self._select(alias), self._timeout, "model tariff lookup")
        self._memo.put(alias, config)
        return config

    async def _select(self, alias: str) -> ModelConfig | None:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_ACTIVE_TARIFF, (alias,))
            row = await cursor.fetchone()
        return None if row is None else ModelConfig(alias, row[0])

    def memo_stats(self) -> MemoStats:
        return self._memo.stats()


class ObservedPrincipalResolver(PrincipalResolver, Protocol):
    """A principal resolver that also reports its memo's hits and misses."""

    def memo_stats(self) -> MemoStats: ...


def key_hash(secret: str) -> bytes:
    """The SHA-256 of a bearer secret: what ``api_keys`` stores and memos are keyed by."""
    return hashlib.sha256(secret.encode()).digest()


_ACTIVE_KEY = "SELECT principal_id FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL"


class ApiKeyPrincipals:
    """Principal of a bearer key found (as its hash) in ``api_keys`` and not revoked."""

    def __init__(
        self,
        pool: Pool,
        *,
        ttl: float = 30.0,
        max_size: int = 10_000,
        timeout: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        self._memo: TtlMemo[bytes, PrincipalId | None] = TtlMemo(ttl, max_size, clock)

    async def resolve(self, caller: Caller) -> PrincipalId | None:
        if not caller.bearer:
            return None
        digest = key_hash(caller.bearer)
        memoised = self._memo.get(digest)
        if memoised is not None:
            return memoised.value
        principal = await bounded(self._select(digest), self._timeout, "api key lookup")
        self._memo.put(digest, principal)
        return principal

    async def _select(self, digest: bytes) -> PrincipalId | None:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_ACTIVE_KEY, (digest,))
            row = await cursor.fetchone()
        return None if row is None else PrincipalId(row[0])

    def memo_stats(self) -> MemoStats:
        return self._memo.stats()


class HeaderPrincipals:
    """Principal named by a trusted header that an authentication filter in front sets.

    Envoy must remove any client-supplied copy of that header; only the configured name counts.
    """

    def __init__(self, header: HeaderName) -> None:
        self._header = header

    async def resolve(self, caller: Caller) -> PrincipalId | None:
        value = caller.headers.get(self._header)
        if value is None:
            value = next((v for k, v in caller.headers.items() if k.lower() == self._header), None)
        value = (value or "").strip()
        return PrincipalId(value) if value else None

    def memo_stats(self) -> MemoStats:
        return MemoStats()


class KeyHashPrincipals:
    """Quick start only: the hex SHA-256 of the bearer key is its own principal."""

    async def resolve(self, caller: Caller) -> PrincipalId | None:
        if not caller.bearer:
            return None
        return PrincipalId(key_hash(caller.bearer).hex())

    def memo_stats(self) -> MemoStats:
        return MemoStats()


def build_principal_resolver(
    source: PrincipalSource, pool: Pool | None, *, ttl: float = 30.0, max_size: int = 10_000
) -> ObservedPrincipalResolver:
    """The principal resolver for a parsed source (``extproc.principals``)."""
    if source.kind is PrincipalKind.API_KEYS:
        if pool is None:
            raise ValueError("principal source 'api_keys' needs a database")
        return ApiKeyPrincipals(pool, ttl=ttl, max_size=max_size)
    if source.header is not None:
        return HeaderPrincipals(source.header)
    return KeyHashPrincipals()
