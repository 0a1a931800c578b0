"""Model-tariff and principal resolvers against a real PostgreSQL (outages through a proxy)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

import psycopg
import pytest

from extproc.adapters.breaker import Breaker, BreakerPolicy, CircuitOpen
from extproc.adapters.pg_resolvers import (
    ApiKeyPrincipals,
    MemoStats,
    PgModelConfigResolver,
    TtlMemo,
    build_principal_resolver,
    key_hash,
)
from extproc.adapters.postgres import Pool
from extproc.core.errors import DependencyError
from extproc.core.model import Caller, ModelConfig, PrincipalId
from extproc.principals import parse_principal_source
from tests.fakes.tcp_proxy import TcpProxy


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def execute(url: str, statement: str, params: tuple[object, ...] = ()) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, params)  # type: ignore[arg-type]


def enable(url: str, alias: str, floor: int) -> None:
    """Expire the active tariff of ``alias`` and open a new one, as the admin CLI does."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "UPDATE model_cache_tariffs SET valid_until = now()"
            " WHERE model_alias = %s AND valid_until IS NULL",
            (alias,),
        )
        conn.execute(
            "INSERT INTO model_cache_tariffs (model_alias, write_multiplier_5m,"
            " write_multiplier_1h, write_multiplier_24h, read_multiplier, min_prefix_tokens)"
            " VALUES (%s, 1.25, 2, 3, 0.1, %s)",
            (alias, floor),
        )


def disable(url: str, alias: str) -> None:
    execute(
        url,
        "UPDATE model_cache_tariffs SET valid_until = now()"
        " WHERE model_alias = %s AND valid_until IS NULL",
        (alias,),
    )


def add_key(url: str, secret: str, principal: str) -> None:
    execute(
        url,
        "INSERT INTO api_keys (key_hash, principal_id) VALUES (%s, %s)",
        (key_hash(secret), principal),
    )


async def test_model_enabled_only_with_an_active_tariff(pg_pool: Pool, database_url: str) -> None:
    resolver = PgModelConfigResolver(pg_pool, ttl=0.0)
    assert await resolver.model_config("m") is None
    enable(database_url, "m", 1024)
    assert await resolver.model_config("m") == ModelConfig("m", 1024)
    enable(database_url, "m", 2048)
    assert await resolver.model_config("m") == ModelConfig("m", 2048)
    disable(database_url, "m")
    assert await resolver.model_config("m") is None
    enable(database_url, "m", 512)
    assert await resolver.model_config("m") == ModelConfig("m", 512)


def test_tariff_ledger_allows_one_active_row_per_model(database_url: str) -> None:
    enable(database_url, "m", 1)
    with pytest.raises(psycopg.errors.UniqueViolation):
        execute(
            database_url,
            "INSERT INTO model_cache_tariffs (model_alias, write_multiplier_5m,"
            " write_multiplier_1h, write_multiplier_24h, read_multiplier, min_prefix_tokens)"
            " VALUES ('m', 1, 1, 1, 1, 1)",
        )


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("DELETE FROM model_cache_tariffs", id="delete"),
        pytest.param("UPDATE model_cache_tariffs SET min_prefix_tokens = 7", id="edit"),
        pytest.param("UPDATE model_cache_tariffs SET valid_until = now()", id="reclose"),
    ],
)
def test_tariff_ledger_is_append_only(database_url: str, statement: str) -> None:
    enable(database_url, "m", 1)
    enable(database_url, "m", 2)
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        execute(database_url, statement)


async def test_model_memo_serves_stale_answers_until_the_ttl(
    pg_pool: Pool, database_url: str
) -> None:
    clock = FakeClock()
    resolver = PgModelConfigResolver(pg_pool, ttl=30.0, clock=clock)
    assert await resolver.model_config("m") is None
    enable(database_url, "m", 100)
    clock.now += 29.0
    assert await resolver.model_config("m") is None
    clock.now += 1.0
    assert await resolver.model_config("m") == ModelConfig("m", 100)
    assert resolver.memo_stats() == MemoStats(hits=1, misses=2, size=1)


def test_memo_evicts_the_least_recently_used() -> None:
    memo: TtlMemo[str, int] = TtlMemo(ttl=60.0, max_size=2, clock=FakeClock())
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") is not None
    memo.put("c", 3)
    assert memo.get("b") is None
    assert [memo.get(k) is not None for k in ("a", "c")] == [True, True]


def caller(bearer: str | None = None, **headers: str) -> Caller:
    return Caller(bearer, headers)


async def test_api_keys_resolve_to_their_principal(pg_pool: Pool, database_url: str) -> None:
    add_key(database_url, "sk-alpha", "tenant-a")
    add_key(database_url, "sk-beta", "tenant-b")
    resolver = build_principal_resolver(parse_principal_source("api_keys"), pg_pool)
    assert await resolver.resolve(caller("sk-alpha")) == PrincipalId("tenant-a")
    assert await resolver.resolve(caller("sk-beta")) == PrincipalId("tenant-b")
    assert await resolver.resolve(caller("sk-unknown")) is None
    assert await resolver.resolve(caller(None)) is None


async def test_revoked_key_is_unknown(pg_pool: Pool, database_url: str) -> None:
    add_key(database_url, "sk-alpha", "tenant-a")
    execute(database_url, "UPDATE api_keys SET revoked_at = now()")
    resolver = ApiKeyPrincipals(pg_pool)
    assert await resolver.resolve(caller("sk-alpha")) is None


async def test_api_key_memo_is_keyed_by_hash_and_remembers_unknowns(
    pg_pool: Pool, database_url: str
) -> None:
    clock = FakeClock()
    resolver = ApiKeyPrincipals(pg_pool, ttl=30.0, clock=clock)
    assert await resolver.resolve(caller("sk-late")) is None
    add_key(database_url, "sk-late", "tenant-a")
    assert await resolver.resolve(caller("sk-late")) is None
    assert resolver.memo_stats() == MemoStats(hits=1, misses=1, size=1)
    assert "sk-late" not in repr(vars(resolver._query.memo))
    clock.now += 30.0
    assert await resolver.resolve(caller("sk-late")) == PrincipalId("tenant-a")


async def test_header_source_trusts_only_its_header() -> None:
    resolver = build_principal_resolver(parse_principal_source("header:X-Tenant"), None)
    assert await resolver.resolve(caller("sk", **{"x-tenant": "tenant-a"})) == "tenant-a"
    spoofed = caller("sk", **{"x-tenant-id": "tenant-b", "x-principal": "tenant-c"})
    assert await resolver.resolve(spoofed) is None
    assert await resolver.resolve(caller("sk", **{"x-tenant": "  "})) is None


async def test_key_hash_source_gives_each_key_its_own_principal() -> None:
    resolver = build_principal_resolver(parse_principal_source("key_hash"), None)
    alpha = await resolver.resolve(caller("sk-alpha"))
    assert alpha == hashlib.sha256(b"sk-alpha").hexdigest()
    assert await resolver.resolve(caller("sk-beta")) != alpha
    assert await resolver.resolve(caller(None)) is None


def test_api_keys_source_needs_a_database() -> None:
    with pytest.raises(ValueError, match="principal source 'api_keys' needs a database"):
        build_principal_resolver(parse_principal_source("api_keys"), None)


# ---- no herds: one query per key at a time, stale answers while the database is away ----


async def test_concurrent_misses_share_one_query(pg_pool: Pool, database_url: str) -> None:
    add_key(database_url, "sk-alpha", "tenant-a")
    resolver = ApiKeyPrincipals(pg_pool)
    answers = await asyncio.gather(*(resolver.resolve(caller("sk-alpha")) for _ in range(10)))
    assert answers == [PrincipalId("tenant-a")] * 10
    assert resolver.memo_stats().misses == 1


async def test_concurrent_model_misses_share_one_query(pg_pool: Pool, database_url: str) -> None:
    enable(database_url, "m", 64)
    resolver = PgModelConfigResolver(pg_pool)
    answers = await asyncio.gather(*(resolver.model_config("m") for _ in range(10)))
    assert answers == [ModelConfig("m", 64)] * 10
    assert resolver.memo_stats().misses == 1


async def test_a_stale_principal_is_served_while_the_database_is_frozen(
    proxied_pool: Pool, database_url: str, pg_proxy: TcpProxy
) -> None:
    add_key(database_url, "sk-alpha", "tenant-a")
    clock = FakeClock()
    resolver = ApiKeyPrincipals(proxied_pool, ttl=30.0, stale_for=60.0, timeout=0.5, clock=clock)
    assert await resolver.resolve(caller("sk-alpha")) == PrincipalId("tenant-a")
    pg_proxy.stall()
    clock.now += 30.0
    answers = await asyncio.gather(*(resolver.resolve(caller("sk-alpha")) for _ in range(5)))
    assert answers == [PrincipalId("tenant-a")] * 5  # at once: a refresh runs meanwhile
    await resolver._query.memo.settle()  # the one refresh failed at its deadline
    assert resolver.memo_stats() == MemoStats(hits=0, misses=2, size=1, joined=0, stale=5)
    await resolver.resolve(caller("sk-alpha"))
    assert resolver.memo_stats().misses == 2  # the next refresh waits a second
    clock.now += 1.0
    await resolver.resolve(caller("sk-alpha"))
    await resolver._query.memo.settle()
    assert resolver.memo_stats().misses == 3
    clock.now += 60.0
    with pytest.raises(DependencyError):  # past the stale bound: asked, and failed
        await resolver.resolve(caller("sk-alpha"))
    pg_proxy.resume()


async def test_a_stale_answer_is_replaced_once_refreshed(pg_pool: Pool, database_url: str) -> None:
    clock = FakeClock()
    resolver = PgModelConfigResolver(pg_pool, ttl=30.0, stale_for=60.0, clock=clock)
    assert await resolver.model_config("m") is None
    enable(database_url, "m", 100)
    clock.now += 30.0
    assert await resolver.model_config("m") is None  # stale, while the refresh runs
    await resolver._query.memo.settle()
    assert await resolver.model_config("m") == ModelConfig("m", 100)


async def test_queries_go_through_the_breaker(
    proxied_pool: Pool, database_url: str, pg_proxy: TcpProxy
) -> None:
    breaker = Breaker("database", BreakerPolicy(failures=1, cooldown_s=60.0), FakeClock())
    resolver = ApiKeyPrincipals(proxied_pool, timeout=0.5, breaker=breaker)
    pg_proxy.stall()
    with pytest.raises(DependencyError, match="no answer within"):
        await resolver.resolve(caller("sk-alpha"))
    with pytest.raises(CircuitOpen):
        await resolver.resolve(caller("sk-beta"))
    pg_proxy.resume()
