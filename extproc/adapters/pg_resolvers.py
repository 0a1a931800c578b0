"""Resolvers backed by PostgreSQL: model tariffs and principals, memoised in-process.

Rules:
* memos (``memo.TtlMemo``) are bounded and entries go stale after a TTL, so an operator's
  change (a tariff, a revoked key) lands within one TTL, plus the one refresh that replaces
  a stale answer while it is still served (at most ``stale_for`` seconds past the TTL);
* concurrent misses of one key share one query; negative answers (unknown model, unknown
  key) are memoised like positive ones; failures are not memoised;
* a memo is keyed by the SHA-256 of a bearer secret, never by the secret;
* queries go through the database's breaker, when there is one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Hashable
from typing import Any, Generic, Protocol, TypeVar

from extproc.adapters.breaker import Breaker, through
from extproc.adapters.memo import MemoStats, TtlMemo
from extproc.adapters.postgres import Connection, Database, Pool
from extproc.core.model import Caller, ModelConfig, PrincipalId
from extproc.core.ports import PrincipalResolver
from extproc.principals import HeaderName, PrincipalKind, PrincipalSource

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
Clock = Callable[[], float]
Row = tuple[Any, ...]


class _MemoisedQuery(Generic[K, V]):
    """A one-row query per key, memoised (``TtlMemo``) and run through the breaker."""

    def __init__(
        self,
        pool: Pool,
        what: str,
        sql: str,
        convert: Callable[[K, Row | None], V],
        memo: TtlMemo[K, V],
        *,
        timeout: float,
        breaker: Breaker | None,
    ) -> None:
        self._db = Database(pool)
        self._what = what
        self._sql = sql
        self._convert = convert
        self.memo = memo
        self._timeout = timeout
        self._breaker = breaker

    async def get(self, key: K) -> V:
        return await self.memo.resolve(
            key, lambda: through(self._breaker, lambda: self._query(key))
        )

    async def _query(self, key: K) -> V:
        async def select(conn: Connection) -> Row | None:
            cursor = await conn.execute(self._sql, (key,))
            return await cursor.fetchone()

        return self._convert(key, await self._db.run(self._what, self._timeout, select))


_ACTIVE_TARIFF = """
SELECT min_prefix_tokens FROM model_cache_tariffs
WHERE model_alias = %s AND valid_from <= now() AND (valid_until IS NULL OR valid_until > now())
ORDER BY valid_from DESC
LIMIT 1
"""


def _model_config(alias: str, row: Row | None) -> ModelConfig | None:
    return None if row is None else ModelConfig(alias, row[0])


class PgModelConfigResolver:
    """Cache-enabled models from ``model_cache_tariffs`` (a ``ports.ModelConfigResolver``)."""

    def __init__(
        self,
        pool: Pool,
        *,
        ttl: float = 30.0,
        stale_for: float = 0.0,
        max_size: int = 1024,
        timeout: float = 1.0,
        breaker: Breaker | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        memo: TtlMemo[str, ModelConfig | None] = TtlMemo(ttl, max_size, clock, stale_for)
        self._query = _MemoisedQuery(
            pool, "model tariff lookup", _ACTIVE_TARIFF, _model_config, memo,
            timeout=timeout, breaker=breaker,
        )  # fmt: skip

    async def model_config(self, alias: str) -> ModelConfig | None:
        return await self._query.get(alias)

    def memo_stats(self) -> MemoStats:
        return self._query.memo.stats()


class ObservedPrincipalResolver(PrincipalResolver, Protocol):
    """A principal resolver that also reports its memo's hits and misses."""

    def memo_stats(self) -> MemoStats: ...


def key_hash(secret: str) -> bytes:
    """The SHA-256 of a bearer secret: what ``api_keys`` stores and memos are keyed by."""
    return hashlib.sha256(secret.encode()).digest()


_ACTIVE_KEY = "SELECT principal_id FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL"


def _principal(_digest: bytes, row: Row | None) -> PrincipalId | None:
    return None if row is None else PrincipalId(row[0])


class ApiKeyPrincipals:
    """Principal of a bearer key found (as its hash) in ``api_keys`` and not revoked."""

    def __init__(
        self,
        pool: Pool,
        *,
        ttl: float = 30.0,
        stale_for: float = 0.0,
        max_size: int = 10_000,
        timeout: float = 1.0,
        breaker: Breaker | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        memo: TtlMemo[bytes, PrincipalId | None] = TtlMemo(ttl, max_size, clock, stale_for)
        self._query = _MemoisedQuery(
            pool, "api key lookup", _ACTIVE_KEY, _principal, memo,
            timeout=timeout, breaker=breaker,
        )  # fmt: skip

    async def resolve(self, caller: Caller) -> PrincipalId | None:
        if not caller.bearer:
            return None
        return await self._query.get(key_hash(caller.bearer))

    def memo_stats(self) -> MemoStats:
        return self._query.memo.stats()


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
    source: PrincipalSource,
    pool: Pool | None,
    *,
    ttl: float = 30.0,
    stale_for: float = 0.0,
    max_size: int = 10_000,
    breaker: Breaker | None = None,
) -> ObservedPrincipalResolver:
    """The principal resolver for a parsed source (``extproc.principals``)."""
    if source.kind is PrincipalKind.API_KEYS:
        if pool is None:
            raise ValueError("principal source 'api_keys' needs a database")
        return ApiKeyPrincipals(
            pool, ttl=ttl, stale_for=stale_for, max_size=max_size, breaker=breaker
        )
    if source.header is not None:
        return HeaderPrincipals(source.header)
    return KeyHashPrincipals()
