"""The index memo's rules, on a fake clock: what it may answer, and which refreshes can wait."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

from extproc.adapters.index_memo import IndexMemo, IndexMemoStats, MemoPolicy
from extproc.core.model import CacheEntry, IndexHit, PrefixHash, PrincipalId, Scope, Tier

SCOPE = Scope(PrincipalId("tenant-a"), "model-x", "tok-1")


def h(label: str) -> PrefixHash:
    return PrefixHash(hashlib.sha256(label.encode()).digest())


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def memo(clock: Clock, **policy: float) -> IndexMemo:
    return IndexMemo(MemoPolicy(**policy), clock)  # type: ignore[arg-type]


def learn(m: IndexMemo, label: str, expires_in: float, tier: Tier = Tier.M5) -> IndexHit:
    hit = IndexHit(h(label), 100, tier)
    m.learn(SCOPE, hit, m.clock() + expires_in, m.clock())
    return hit


def test_answers_when_the_deepest_candidate_is_known() -> None:
    m = memo(Clock())
    hit = learn(m, "deep", 300)
    assert m.answer(SCOPE, [h("deep"), h("shallow")]) == hit


def test_never_answers_when_a_deeper_candidate_is_unknown() -> None:
    """Another replica may have written the deeper entry: only PostgreSQL can say."""
    m = memo(Clock())
    learn(m, "shallow", 300)
    assert m.answer(SCOPE, [h("deep"), h("shallow")]) is None


OTHER_SCOPES = [
    pytest.param(Scope(PrincipalId("tenant-b"), "model-x", "tok-1"), id="other-principal"),
    pytest.param(Scope(PrincipalId("tenant-a"), "model-y", "tok-1"), id="other-model"),
    pytest.param(Scope(PrincipalId("tenant-a"), "model-x", "tok-2"), id="other-tokenizer"),
]


@pytest.mark.parametrize("other", OTHER_SCOPES)
def test_never_crosses_scopes(other: Scope) -> None:
    m = memo(Clock())
    learn(m, "p0", 300)
    assert m.answer(other, [h("p0")]) is None


def test_serves_a_hit_for_at_most_its_ttl() -> None:
    clock = Clock()
    m = memo(clock, ttl=2.0)
    hit = learn(m, "p0", 300)
    clock.now += 1.99
    assert m.answer(SCOPE, [h("p0")]) == hit
    clock.now += 0.01
    assert m.answer(SCOPE, [h("p0")]) is None


def test_never_serves_past_the_expiry_less_the_margin() -> None:
    clock = Clock()
    m = memo(clock, ttl=60.0, margin=1.0)
    hit = learn(m, "p0", 10)
    clock.now += 8.99
    assert m.answer(SCOPE, [h("p0")]) == hit
    clock.now += 0.01
    assert m.answer(SCOPE, [h("p0")]) is None


def test_a_zero_ttl_never_answers() -> None:
    m = memo(Clock(), ttl=0.0)
    learn(m, "p0", 300)
    assert m.answer(SCOPE, [h("p0")]) is None


def test_what_a_commit_wrote_is_known_for_its_tier() -> None:
    clock = Clock()
    m = memo(clock, ttl=60.0)
    m.wrote(SCOPE, [CacheEntry(h("new"), 900, Tier.H1)], clock.now)
    assert m.answer(SCOPE, [h("new")]) == IndexHit(h("new"), 900, Tier.H1)
    assert not m.needs_refresh(SCOPE, IndexHit(h("new"), 900, Tier.H1))


REFRESHES = [
    pytest.param(300.0, 0.1, False, id="all-left"),
    pytest.param(270.5, 0.1, False, id="just-over-90pc-left"),
    pytest.param(270.0, 0.1, True, id="90pc-left"),
    pytest.param(10.0, 0.1, True, id="nearly-expired"),
    pytest.param(299.0, 0.0, True, id="no-debounce"),
    pytest.param(160.0, 0.5, False, id="half-debounce-more-than-half-left"),
]


@pytest.mark.parametrize(("left", "debounce", "due"), REFRESHES)
def test_a_refresh_waits_while_most_of_the_tier_is_left(
    left: float, debounce: float, due: bool
) -> None:
    m = memo(Clock(), debounce=debounce)
    hit = learn(m, "read", left)
    assert m.needs_refresh(SCOPE, hit) is due


def test_an_unknown_read_is_always_refreshed() -> None:
    m = memo(Clock())
    assert m.needs_refresh(SCOPE, IndexHit(h("never-seen"), 1, Tier.M5))


def test_a_read_of_another_tier_is_refreshed() -> None:
    m = memo(Clock())
    learn(m, "read", 300, Tier.M5)
    assert m.needs_refresh(SCOPE, IndexHit(h("read"), 100, Tier.H1))


def test_keeps_at_most_max_size_entries_least_recently_used_out() -> None:
    m = memo(Clock(), max_size=2)
    a, _b = learn(m, "a", 300), learn(m, "b", 300)
    assert m.answer(SCOPE, [h("a")]) == a
    learn(m, "c", 300)
    assert m.answer(SCOPE, [h("b")]) is None
    assert m.answer(SCOPE, [h("a")]) == a


def test_counts_what_it_answered_and_skipped() -> None:
    m = memo(Clock())
    hit = learn(m, "p0", 300)
    m.answer(SCOPE, [h("p0")])
    m.answer(SCOPE, [h("p1")])
    m.needs_refresh(SCOPE, hit)
    m.needs_refresh(SCOPE, IndexHit(h("p1"), 1, Tier.M5))
    assert m.stats() == IndexMemoStats(hits=1, misses=1, refreshes_skipped=1, refreshes_written=1)


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param({"ttl": -1.0}, id="negative-ttl"),
        pytest.param({"debounce": 1.0}, id="debounce-whole-tier"),
        pytest.param({"max_size": 0}, id="no-room"),
    ],
)
def test_policy_rejects_nonsense(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="memo"):
        MemoPolicy(**policy)  # type: ignore[arg-type]
