"""In-memory fakes of the core's ports: principals, model configs, the prefix index, a tokenizer.

Each fake records its calls and raises the error set in its ``error`` field (if any), so tests
can check call counts and simulate outages of one port at a time. The fake tokenizer counts
whitespace-separated words, which is additive across segments like a real tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from extproc.core.errors import UnmappedModel
from extproc.core.model import (
    Caller,
    IndexHit,
    ModelConfig,
    PendingWrite,
    PrefixHash,
    PrincipalId,
    Scope,
    Tier,
    TokenCounts,
)


def _raise(error: Exception | None) -> None:
    if error is not None:
        raise error


@dataclass
class FakePrincipals:
    """Bearer token → principal."""

    keys: Mapping[str, PrincipalId] = field(default_factory=dict)
    error: Exception | None = None
    calls: list[Caller] = field(default_factory=list)

    async def resolve(self, caller: Caller) -> PrincipalId | None:
        self.calls.append(caller)
        _raise(self.error)
        return self.keys.get(caller.bearer or "")


@dataclass
class FakeModels:
    """Alias → model config; absent aliases are not cache-enabled."""

    configs: Mapping[str, ModelConfig] = field(default_factory=dict)
    error: Exception | None = None
    calls: list[str] = field(default_factory=list)

    async def model_config(self, alias: str) -> ModelConfig | None:
        self.calls.append(alias)
        _raise(self.error)
        return self.configs.get(alias)


@dataclass(frozen=True, slots=True)
class Lookup:
    """One recorded ``PrefixIndex.lookup`` call."""

    scope: Scope
    hashes: tuple[PrefixHash, ...]


@dataclass
class FakeIndex:
    """Live entries per scope; nothing expires (tests that need expiry use the real index)."""

    entries: dict[tuple[Scope, PrefixHash], IndexHit] = field(default_factory=dict)
    error: Exception | None = None
    lookups: list[Lookup] = field(default_factory=list)
    commits: list[PendingWrite] = field(default_factory=list)
    refreshed: list[IndexHit] = field(default_factory=list)

    def seed(self, scope: Scope, prefix_hash: PrefixHash, tokens: int, tier: Tier) -> IndexHit:
        hit = IndexHit(prefix_hash, tokens, tier)
        self.entries[(scope, prefix_hash)] = hit
        return hit

    async def lookup(self, scope: Scope, hashes: Sequence[PrefixHash]) -> Sequence[IndexHit]:
        self.lookups.append(Lookup(scope, tuple(hashes)))
        _raise(self.error)
        found = (self.entries.get((scope, h)) for h in hashes)
        return [hit for hit in found if hit is not None]

    def due(self, pending: PendingWrite) -> bool:
        return not pending.is_empty

    async def commit(self, pending: PendingWrite) -> None:
        self.commits.append(pending)
        _raise(self.error)
        for entry in pending.entries:
            self.seed(pending.scope, entry.prefix_hash, entry.cumulative_token_count, entry.tier)
        if pending.refresh is not None:
            self.refreshed.append(pending.refresh)


@dataclass(frozen=True, slots=True)
class Count:
    """One recorded ``Tokenizer.count`` call."""

    alias: str
    segments: tuple[str, ...]


@dataclass
class FakeTokenizer:
    """Counts words; ``reported_version``/``drop_counts`` make it misbehave on ``count``."""

    versions: Mapping[str, str] = field(default_factory=dict)
    error: Exception | None = None
    count_error: Exception | None = None
    reported_version: str | None = None
    drop_counts: int = 0
    counts: list[Count] = field(default_factory=list)
    version_calls: list[str] = field(default_factory=list)

    async def version(self, alias: str) -> str | None:
        self.version_calls.append(alias)
        _raise(self.error)
        return self.versions.get(alias)

    async def count(self, alias: str, segments: Sequence[str]) -> TokenCounts:
        self.counts.append(Count(alias, tuple(segments)))
        _raise(self.error or self.count_error)
        if alias not in self.versions:
            raise UnmappedModel(alias)
        version = self.reported_version or self.versions[alias]
        counts = tuple(len(s.split()) for s in segments)
        return TokenCounts(version, counts[: len(counts) - self.drop_counts])
