"""classify against in-memory fakes: every outcome, degradation path and the read/write split."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from extproc.core import codec
from extproc.core.classify import ClassifyPorts, EngineCache, classify
from extproc.core.errors import DependencyError, UnmappedModel
from extproc.core.model import (
    CacheEntry,
    Caller,
    Classification,
    IndexHit,
    ModelConfig,
    Outcome,
    PendingWrite,
    PrincipalId,
    RequestPolicy,
    Scope,
    Split,
    Tier,
)
from extproc.core.request import Prepared, prepare
from tests.fakes.ports import Count, FakeIndex, FakeModels, FakePrincipals, FakeTokenizer

MODEL = "m"
ACME = PrincipalId("acme")
SCOPE = Scope(ACME, MODEL, "v1")
CALLER = Caller(bearer="key-acme")


@dataclass
class World:
    """The fakes behind one ``ClassifyPorts``."""

    principals: FakePrincipals = field(
        default_factory=lambda: FakePrincipals({"key-acme": ACME, "key-beta": PrincipalId("beta")})
    )
    models: FakeModels = field(default_factory=lambda: FakeModels({MODEL: ModelConfig(MODEL, 0)}))
    index: FakeIndex = field(default_factory=FakeIndex)
    tokenizer: FakeTokenizer = field(default_factory=lambda: FakeTokenizer({MODEL: "v1"}))

    @property
    def ports(self) -> ClassifyPorts:
        return ClassifyPorts(self.principals, self.models, self.index, self.tokenizer)

    def floor(self, tokens: int) -> None:
        self.models.configs = {MODEL: ModelConfig(MODEL, tokens)}


@pytest.fixture
def world() -> World:
    return World()


def _words(block: int, count: int) -> str:
    return " ".join(f"b{block}w{i}" for i in range(count))


def request(sizes: list[int], marks: dict[int, str | None], model: Any = MODEL) -> Prepared:
    """One user message whose block *i* has ``sizes[i]`` words; ``marks`` maps block → ttl."""
    blocks: list[dict[str, Any]] = []
    for i, size in enumerate(sizes):
        block: dict[str, Any] = {"type": "text", "text": _words(i, size)}
        if i in marks:
            ttl = marks[i]
            block["cache_control"] = {"type": "ephemeral"} | ({"ttl": ttl} if ttl else {})
        blocks.append(block)
    body = {"model": model, "messages": [{"role": "user", "content": blocks}]}
    prepared = prepare(codec.dumps(body), RequestPolicy())
    assert prepared is not None
    return prepared


def _texts(req: Prepared, start: int, stop: int) -> tuple[str, ...]:
    return tuple(b.text for b in req.blocks[start:stop])


async def test_create_only(world: World) -> None:
    req = request([10, 20, 30], {1: "5m"})
    result = await classify(req, CALLER, world.ports)
    assert result == Classification(
        Outcome.CREATE_ONLY,
        split=Split(read=0, creation={Tier.M5: 30}),
        pending=PendingWrite(SCOPE, (CacheEntry(req.hashes[1], 30, Tier.M5),), None),
        model=MODEL,
        principal=ACME,
    )
    assert world.tokenizer.counts == [Count(MODEL, _texts(req, 0, 2))]
    assert len(world.index.lookups) == 1
    assert world.index.lookups[0].scope == SCOPE
    assert world.index.lookups[0].hashes == (req.hashes[1], req.hashes[0])


async def test_creation_per_tier(world: World) -> None:
    req = request([10, 20, 30, 40], {0: "1h", 2: None, 3: "24h"})
    result = await classify(req, CALLER, world.ports)
    assert result.outcome is Outcome.CREATE_ONLY
    assert result.split == Split(read=0, creation={Tier.H1: 10, Tier.M5: 50, Tier.H24: 40})
    assert result.pending is not None
    assert result.pending.entries == (
        CacheEntry(req.hashes[0], 10, Tier.H1),
        CacheEntry(req.hashes[2], 60, Tier.M5),
        CacheEntry(req.hashes[3], 100, Tier.H24),
    )
    assert len(world.tokenizer.counts) == 1
    assert world.tokenizer.counts[0].segments == _texts(req, 0, 4)


async def test_same_tier_breakpoints_add_up(world: World) -> None:
    req = request([5, 6, 7], {0: "5m", 2: "5m"})
    result = await classify(req, CALLER, world.ports)
    assert result.split == Split(creation={Tier.M5: 18})


async def test_read_and_create(world: World) -> None:
    req = request([10, 20, 30, 40], {1: "1h", 3: "5m"})
    hit = world.index.seed(SCOPE, req.hashes[1], 33, Tier.H1)
    result = await classify(req, CALLER, world.ports)
    assert result == Classification(
        Outcome.READ_AND_CREATE,
        split=Split(read=33, creation={Tier.M5: 70}),
        pending=PendingWrite(SCOPE, (CacheEntry(req.hashes[3], 103, Tier.M5),), hit),
        model=MODEL,
        principal=ACME,
    )
    assert world.tokenizer.counts == [Count(MODEL, _texts(req, 2, 4))]


async def test_read_at_deepest_breakpoint_needs_no_tokenization(world: World) -> None:
    req = request([10, 20, 30], {0: "5m", 1: "1h"})
    hit = world.index.seed(SCOPE, req.hashes[1], 30, Tier.H1)
    result = await classify(req, CALLER, world.ports)
    assert result == Classification(
        Outcome.READ,
        split=Split(read=30),
        pending=PendingWrite(SCOPE, (), hit),
        model=MODEL,
        principal=ACME,
    )
    assert world.tokenizer.counts == []


async def test_deepest_of_several_hits_wins(world: World) -> None:
    req = request([10, 20, 30, 40, 50], {0: "5m", 2: "5m", 4: "1h"})
    world.index.seed(SCOPE, req.hashes[0], 10, Tier.M5)
    world.index.seed(SCOPE, req.hashes[2], 60, Tier.M5)
    deepest = world.index.seed(SCOPE, req.hashes[3], 100, Tier.H1)
    result = await classify(req, CALLER, world.ports)
    assert result.outcome is Outcome.READ_AND_CREATE
    assert result.split == Split(read=100, creation={Tier.H1: 50})
    assert result.pending == PendingWrite(
        SCOPE, (CacheEntry(req.hashes[4], 150, Tier.H1),), deepest
    )
    assert world.tokenizer.counts == [Count(MODEL, _texts(req, 4, 5))]


async def test_one_lookup_for_all_breakpoints_deduplicated(world: World) -> None:
    req = request([1] * 30, {3: "5m", 10: "5m", 29: "5m"})
    await classify(req, CALLER, world.ports)
    assert len(world.index.lookups) == 1
    looked_up = world.index.lookups[0].hashes
    assert len(looked_up) == len(set(looked_up)) == 30
    assert set(looked_up) == set(req.hashes)


WINDOW = [
    pytest.param(2, 2, id="twentieth-boundary-found"),
    pytest.param(1, -1, id="twenty-first-boundary-out-of-reach"),
    pytest.param(21, 21, id="the-breakpoint-itself"),
]


@pytest.mark.parametrize(("seeded", "read_block"), WINDOW)
async def test_walkback_window(world: World, seeded: int, read_block: int) -> None:
    req = request([1] * 22, {21: "5m"})
    world.index.seed(SCOPE, req.hashes[seeded], seeded + 1, Tier.M5)
    result = await classify(req, CALLER, world.ports)
    assert result.split is not None
    assert result.split.read == (read_block + 1 if read_block >= 0 else 0)
    assert result.split.creation_total == 21 - read_block


async def test_entries_are_scoped(world: World) -> None:
    req = request([10, 20], {1: "5m"})
    world.index.seed(Scope(PrincipalId("beta"), MODEL, "v1"), req.hashes[1], 30, Tier.M5)
    world.index.seed(Scope(ACME, MODEL, "v0"), req.hashes[1], 30, Tier.M5)
    result = await classify(req, CALLER, world.ports)
    assert result.outcome is Outcome.CREATE_ONLY


async def test_commit_then_read(world: World) -> None:
    req = request([10, 20, 30], {1: "1h"})
    first = await classify(req, CALLER, world.ports)
    assert first.pending is not None
    await world.index.commit(first.pending)
    second = await classify(req, CALLER, world.ports)
    assert second.outcome is Outcome.READ
    assert second.split == Split(read=30)
    assert second.pending == PendingWrite(SCOPE, (), IndexHit(req.hashes[1], 30, Tier.H1))


FLOOR = [
    pytest.param(61, Outcome.ZERO_ACTIVE, Split(), "below_floor", id="below"),
    pytest.param(60, Outcome.CREATE_ONLY, Split(creation={Tier.M5: 60}), "", id="exactly-at"),
]


@pytest.mark.parametrize(("floor", "outcome", "split", "reason"), FLOOR)
async def test_floor(world: World, floor: int, outcome: Outcome, split: Split, reason: str) -> None:
    world.floor(floor)
    result = await classify(request([10, 20, 30, 40], {0: "5m", 2: "5m"}), CALLER, world.ports)
    assert (result.outcome, result.split, result.reason) == (outcome, split, reason)
    assert (result.pending is None) is (outcome is Outcome.ZERO_ACTIVE)


async def test_below_floor_with_read_keeps_read_and_refresh(world: World) -> None:
    world.floor(1000)
    req = request([10, 20, 30], {0: "5m", 2: "5m"})
    hit = world.index.seed(SCOPE, req.hashes[0], 10, Tier.M5)
    result = await classify(req, CALLER, world.ports)
    assert result == Classification(
        Outcome.READ,
        split=Split(read=10),
        pending=PendingWrite(SCOPE, (), hit),
        reason="below_floor",
        model=MODEL,
        principal=ACME,
    )


MISMATCH = [
    pytest.param({"reported_version": "v2"}, id="other-tokenizer-version"),
    pytest.param({"drop_counts": 1}, id="fewer-counts"),
]


@pytest.mark.parametrize("misbehaviour", MISMATCH)
async def test_count_mismatch(world: World, misbehaviour: dict[str, Any]) -> None:
    for name, value in misbehaviour.items():
        setattr(world.tokenizer, name, value)
    req = request([10, 20], {1: "5m"})
    world.index.seed(SCOPE, req.hashes[0], 10, Tier.M5)
    result = await classify(req, CALLER, world.ports)
    assert result == Classification.zero("count_mismatch", MODEL, ACME)


INACTIVE = [
    pytest.param(Caller(bearer=None), MODEL, "no_bearer", id="no-bearer"),
    pytest.param(Caller(bearer=""), MODEL, "no_bearer", id="empty-bearer"),
    pytest.param(CALLER, None, "no_model", id="no-model"),
    pytest.param(CALLER, "other", "model_disabled", id="model-disabled"),
    pytest.param(Caller(bearer="key-stranger"), MODEL, "unknown_principal", id="unknown-key"),
]


@pytest.mark.parametrize(("caller", "model", "reason"), INACTIVE)
async def test_inactive(world: World, caller: Caller, model: str | None, reason: str) -> None:
    result = await classify(request([10], {0: "5m"}, model=model), caller, world.ports)
    assert result == Classification.inactive(reason)
    assert result.split is None
    assert world.index.lookups == []
    assert world.tokenizer.counts == []


async def test_no_markers_is_zero_active_and_asks_no_tokenizer(world: World) -> None:
    result = await classify(request([10, 20], {}), CALLER, world.ports)
    assert result == Classification.zero("no_markers", MODEL, ACME)
    assert world.index.lookups == []
    assert world.tokenizer.version_calls == []
    assert world.tokenizer.counts == []


def _prepared(body: dict[str, Any], automatic: bool = False) -> Prepared:
    prepared = prepare(codec.dumps({"model": MODEL, **body}), RequestPolicy(), automatic)
    assert prepared is not None
    return prepared


ONE_MESSAGE = {"messages": [{"role": "user", "content": "hello there"}]}
ENGINE = [
    pytest.param(_prepared(ONE_MESSAGE), True, id="unmarked"),
    pytest.param(_prepared({**ONE_MESSAGE, "cache_control": None}), True, id="top-level-null"),
    pytest.param(
        _prepared({"messages": [], "cache_control": {"type": "ephemeral"}}),
        False,
        id="top-level-marker-without-blocks",
    ),
    pytest.param(_prepared({"messages": []}, automatic=True), False, id="query-parameter"),
]


@pytest.mark.parametrize(("req", "engine"), ENGINE)
async def test_engine_reports_only_for_requests_without_any_marker(
    world: World, req: Prepared, engine: bool
) -> None:
    ports = replace(world.ports, engine_cache=EngineCache.REPORT)
    result = await classify(req, CALLER, ports)
    expected = (
        Classification.engine_read(MODEL, ACME)
        if engine
        else Classification.zero("no_markers", MODEL, ACME)
    )
    assert result == expected
    assert world.tokenizer.version_calls == []


async def test_marked_requests_are_accounted_by_the_index_even_with_engine_reports(
    world: World,
) -> None:
    ports = replace(world.ports, engine_cache=EngineCache.REPORT)
    result = await classify(request([10, 20], {1: "5m"}), CALLER, ports)
    assert not result.engine
    assert result.split == Split(creation={Tier.M5: 30})


async def test_engine_reports_are_off_by_default(world: World) -> None:
    result = await classify(_prepared(ONE_MESSAGE), CALLER, world.ports)
    assert result == Classification.zero("no_markers", MODEL, ACME)


async def test_unmapped_tokenizer_is_zero_active(world: World) -> None:
    world.tokenizer.versions = {}
    result = await classify(request([10], {0: "5m"}), CALLER, world.ports)
    assert result == Classification.zero("tokenizer_unmapped", MODEL, ACME)
    assert world.index.lookups == []


def _fail_principals(world: World) -> None:
    world.principals.error = DependencyError("principals down")


def _fail_models(world: World) -> None:
    world.models.error = DependencyError("config down")


def _fail_index(world: World) -> None:
    world.index.error = DependencyError("index down")


def _fail_version(world: World) -> None:
    world.tokenizer.error = DependencyError("tokenizer down")


def _fail_count(world: World) -> None:
    world.tokenizer.count_error = DependencyError("tokenizer down")


def _unmapped_count(world: World) -> None:
    world.tokenizer.count_error = UnmappedModel(MODEL)


ZERO_DEGRADED = Classification.zero("dependency_error", MODEL, ACME)

DEGRADED = [
    pytest.param(_fail_principals, Classification.inactive("dependency_error"), id="principals"),
    pytest.param(_fail_models, Classification.inactive("dependency_error"), id="model-config"),
    pytest.param(_fail_index, ZERO_DEGRADED, id="index"),
    pytest.param(_fail_version, ZERO_DEGRADED, id="tok-version"),
    pytest.param(_fail_count, ZERO_DEGRADED, id="tok-count"),
    pytest.param(_unmapped_count, ZERO_DEGRADED, id="unmapped"),
]


@pytest.mark.parametrize(("break_it", "expected"), DEGRADED)
async def test_dependency_failures_degrade(
    world: World, break_it: Any, expected: Classification
) -> None:
    break_it(world)
    assert await classify(request([10, 20], {1: "5m"}), CALLER, world.ports) == expected


BUGS = [
    pytest.param("principals", id="principals"),
    pytest.param("models", id="models"),
    pytest.param("index", id="index"),
    pytest.param("tokenizer", id="tokenizer"),
]


@pytest.mark.parametrize("port", BUGS)
async def test_other_errors_propagate(world: World, port: str) -> None:
    getattr(world, port).error = KeyError("bug")
    with pytest.raises(KeyError):
        await classify(request([10, 20], {1: "5m"}), CALLER, world.ports)
