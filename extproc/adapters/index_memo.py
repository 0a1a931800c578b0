"""What this process knows of the prefix index: recent live hits, and when each expires.

Rules:
* keyed by (scope, prefix hash), so nothing is ever shared across scopes; only hits are kept
  (a miss is never remembered: another replica may write the entry at any time);
* expiries are on this process's monotonic clock, taken before the statement that reported
  them was sent, so they are never later than PostgreSQL's;
* a hit is *served* only while it is younger than ``ttl`` (an operator's purge, or any change
  another replica makes, lands within ``ttl``) and while ``now < expires_at - margin``;
* a lookup is answered from memory only when its first hash, the deepest candidate (the core
  passes candidates deepest first), is a servable hit: the deepest hit wins and nothing
  deeper is asked about, so no deeper entry another replica wrote can be hidden. Such an
  answer holds that one hit (the one classify reads); any other lookup goes to PostgreSQL;
* a refresh (the sliding expiry of a read) is needed only once less than ``1 - debounce`` of
  the entry's tier is left, as far as this process knows; an entry it knows nothing of is
  always refreshed. So an entry expires at most ``debounce`` of its tier earlier than a
  strict sliding window would make it;
* at most ``max_size`` entries, least recently used first out.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from extproc.core.model import CacheEntry, IndexHit, PrefixHash, Scope

Clock = Callable[[], float]
_Key = tuple[Scope, PrefixHash]


@dataclass(frozen=True, slots=True)
class MemoPolicy:
    """How long a hit may be served from memory, and how much of a tier a refresh may skip."""

    ttl: float = 2.0
    margin: float = 1.0
    debounce: float = 0.1
    max_size: int = 10_000

    def __post_init__(self) -> None:
        if self.ttl < 0 or self.margin < 0 or not 0 <= self.debounce < 1 or self.max_size < 1:
            raise ValueError("memo ttl and margin must be >= 0, debounce in [0, 1), size >= 1")


@dataclass(frozen=True, slots=True)
class _Known:
    hit: IndexHit
    expires_at: float
    seen_at: float


@dataclass(frozen=True, slots=True)
class IndexMemoStats:
    """Lookups answered from memory or not, and refreshes written or skipped."""

    hits: int = 0
    misses: int = 0
    refreshes_skipped: int = 0
    refreshes_written: int = 0


class IndexMemo:
    """Recent live hits of the prefix index; see the module docstring for the rules."""

    def __init__(self, policy: MemoPolicy | None = None, clock: Clock = time.monotonic) -> None:
        self.policy = policy or MemoPolicy()
        self.clock = clock
        self._known: OrderedDict[_Key, _Known] = OrderedDict()
        self._hits = self._misses = self._skipped = self._written = 0

    def answer(self, scope: Scope, hashes: Sequence[PrefixHash]) -> IndexHit | None:
        """The deepest candidate's hit, when memory may answer the lookup on its own."""
        known = self._known.get((scope, hashes[0])) if hashes and self.policy.ttl > 0 else None
        now = self.clock()
        if known is None or not self._servable(known, now):
            self._misses += 1
            return None
        self._known.move_to_end((scope, hashes[0]))
        self._hits += 1
        return known.hit

    def learn(self, scope: Scope, hit: IndexHit, expires_at: float, seen_at: float) -> None:
        """Remember ``hit``, live until ``expires_at``, as PostgreSQL said at ``seen_at``."""
        key = (scope, hit.prefix_hash)
        self._known[key] = _Known(hit, expires_at, seen_at)
        self._known.move_to_end(key)
        while len(self._known) > self.policy.max_size:
            self._known.popitem(last=False)

    def wrote(self, scope: Scope, entries: Sequence[CacheEntry], sent_at: float) -> None:
        """Remember entries a commit sent at ``sent_at`` wrote (live for their tier from then)."""
        for entry in entries:
            hit = IndexHit(entry.prefix_hash, entry.cumulative_token_count, entry.tier)
            self.learn(scope, hit, sent_at + entry.tier.seconds, sent_at)

    def needs_refresh(self, scope: Scope, hit: IndexHit) -> bool:
        """Whether the read ``hit`` must have its expiry slid now (see the module rules)."""
        due = self.refresh_due(scope, hit)
        if due:
            self._written += 1
        else:
            self._skipped += 1
        return due

    def skipped_refresh(self) -> None:
        """Count a refresh that was found not due before its commit was even started."""
        self._skipped += 1

    def refresh_due(self, scope: Scope, hit: IndexHit) -> bool:
        """``needs_refresh`` without counting it."""
        known = self._known.get((scope, hit.prefix_hash))
        if known is None or known.hit.tier is not hit.tier:
            return True
        left = known.expires_at - self.clock()
        return left <= (1 - self.policy.debounce) * hit.tier.seconds

    def stats(self) -> IndexMemoStats:
        return IndexMemoStats(self._hits, self._misses, self._skipped, self._written)

    def _servable(self, known: _Known, now: float) -> bool:
        policy = self.policy
        return now - known.seen_at < policy.ttl and now < known.expires_at - policy.margin
