"""Domain values shared by the core and the adapters: tiers, scopes, entries, splits, outcomes.

Invariants:
* every value is a frozen, slotted dataclass or an enum; nothing here does I/O;
* a ``PrefixHash`` is the 32-byte SHA-256 digest defined in ``prefix``, never other bytes;
* a ``Split`` never changes ``prompt_tokens``; it only says how many of them were read or written.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NewType

PrefixHash = NewType("PrefixHash", bytes)
PrincipalId = NewType("PrincipalId", str)


class Tier(enum.Enum):
    """A cache TTL tier as written in ``cache_control.ttl``."""

    M5 = "5m"
    H1 = "1h"
    H24 = "24h"

    @property
    def seconds(self) -> int:
        return _TIER_SECONDS[self]

    @property
    def usage_key(self) -> str:
        """The key of this tier inside ``usage.cache_creation``."""
        return f"ephemeral_{self.value}_input_tokens"

    @classmethod
    def parse(cls, text: str) -> Tier | None:
        """The tier named by ``text`` or ``None`` when it names none."""
        try:
            return cls(text)
        except ValueError:
            return None


_TIER_SECONDS = {Tier.M5: 300, Tier.H1: 3600, Tier.H24: 86400}


@dataclass(frozen=True, slots=True)
class TierPolicy:
    """Which tiers this deployment offers and which one a marker without ``ttl`` gets."""

    enabled: frozenset[Tier] = frozenset(Tier)
    default: Tier = Tier.M5

    def __post_init__(self) -> None:
        if self.default not in self.enabled:
            raise ValueError(f"default tier {self.default.value} is not enabled")

    def available(self) -> str:
        """Enabled tiers in canonical order, e.g. ``"5m, 1h"``."""
        return ", ".join(t.value for t in Tier if t in self.enabled)


DEFAULT_TELEMETRY_PREFIXES = ("x-anthropic-billing-header:",)


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    """How request bodies are read: the tier policy and the telemetry blocks to leave out.

    A telemetry block is an unmarked text block of a system message whose text (leading white
    space trimmed) starts with one of ``telemetry_prefixes``; it is never hashed or tokenized,
    and ``strip_telemetry`` removes it from the forwarded body too.
    """

    tiers: TierPolicy = field(default_factory=TierPolicy)
    telemetry_prefixes: tuple[str, ...] = DEFAULT_TELEMETRY_PREFIXES
    strip_telemetry: bool = True


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent the request, as far as Envoy tells: bearer token and the headers we forward."""

    bearer: str | None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Scope:
    """What an index entry belongs to; nothing is ever shared across scopes."""

    principal_id: PrincipalId
    virtual_model: str
    tokenizer_version: str


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A cache-enabled model: its alias and the smallest prefix worth caching."""

    alias: str
    min_prefix_tokens: int


@dataclass(frozen=True, slots=True)
class IndexHit:
    """A live index entry found for one of the looked-up prefix hashes."""

    prefix_hash: PrefixHash
    cumulative_token_count: int
    tier: Tier


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """An entry to upsert: the prefix up to a breakpoint, its token count and tier."""

    prefix_hash: PrefixHash
    cumulative_token_count: int
    tier: Tier


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """What a successful response commits: new entries and the sliding refresh of the read."""

    scope: Scope
    entries: tuple[CacheEntry, ...]
    refresh: IndexHit | None

    @property
    def is_empty(self) -> bool:
        return not self.entries and self.refresh is None


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """One tokenization of several segments: per-segment counts and the version that made them."""

    tokenizer_version: str
    segment_counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.segment_counts)


@dataclass(frozen=True, slots=True)
class Split:
    """The cache accounting of one request: tokens read, and tokens written per tier."""

    read: int = 0
    creation: Mapping[Tier, int] = field(default_factory=dict)

    @property
    def creation_total(self) -> int:
        return sum(self.creation.values())

    def created(self, tier: Tier) -> int:
        return self.creation.get(tier, 0)


class Outcome(enum.Enum):
    """The request outcome, as the ``outcome`` metric label spells it."""

    INACTIVE = "inactive"
    ZERO_ACTIVE = "zero_active"
    READ = "read"
    CREATE_ONLY = "create_only"
    READ_AND_CREATE = "read_and_create"


@dataclass(frozen=True, slots=True)
class Classification:
    """The result of classify: the outcome, the split to inject and what to commit on success.

    ``split`` is ``None`` exactly when the outcome is inactive (no cache fields of ours);
    ``reason`` says why a request degraded (e.g. ``"no_bearer"``, ``"below_floor"``);
    ``engine`` means the read is the engine's own prefix-cache hits, taken from the response;
    ``principal`` is the tenant once it was resolved (never a key or a hash of one).
    """

    outcome: Outcome
    split: Split | None = None
    pending: PendingWrite | None = None
    reason: str = ""
    model: str | None = None
    engine: bool = False
    principal: PrincipalId | None = None

    @classmethod
    def inactive(cls, reason: str) -> Classification:
        return cls(Outcome.INACTIVE, reason=reason)

    @classmethod
    def zero(cls, reason: str, model: str, principal: PrincipalId | None = None) -> Classification:
        return cls(
            Outcome.ZERO_ACTIVE, split=Split(), reason=reason, model=model, principal=principal
        )

    @classmethod
    def engine_read(cls, model: str, principal: PrincipalId | None = None) -> Classification:
        """An unmarked request whose read is what the engine reports (DESIGN §3.0.2)."""
        return cls(
            Outcome.ZERO_ACTIVE,
            split=Split(),
            reason="engine_cache",
            model=model,
            engine=True,
            principal=principal,
        )
