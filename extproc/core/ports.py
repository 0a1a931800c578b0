"""The ports the core asks questions through; ``extproc.adapters`` supplies the real ones.

Every port raises ``DependencyError`` (from ``errors``) for an outage; the core turns that into
a degraded outcome, never into an error for the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from extproc.core.model import (
    Caller,
    IndexHit,
    ModelConfig,
    PendingWrite,
    PrefixHash,
    PrincipalId,
    Scope,
    TokenCounts,
)


class PrincipalResolver(Protocol):
    """Maps a caller to its billing principal, or ``None`` when the caller is unknown."""

    async def resolve(self, caller: Caller) -> PrincipalId | None: ...


class ModelConfigResolver(Protocol):
    """Says whether a model alias is cache-enabled now, and with which floor."""

    async def model_config(self, alias: str) -> ModelConfig | None: ...


class PrefixIndex(Protocol):
    """The persistent prefix index (PostgreSQL in production)."""

    async def lookup(self, scope: Scope, hashes: Sequence[PrefixHash]) -> Sequence[IndexHit]:
        """Live entries (``expires_at > now``) of ``scope`` among ``hashes``, in one round trip."""
        ...

    def due(self, pending: PendingWrite) -> bool:
        """Whether ``commit(pending)`` would write anything now (a refresh can be debounced)."""
        ...

    async def commit(self, pending: PendingWrite) -> None:
        """Upsert the new entries and slide the refreshed entry's expiry, atomically."""
        ...


class Tokenizer(Protocol):
    """Counts tokens with a model's real tokenizer, no special tokens added."""

    async def version(self, alias: str) -> str | None:
        """The tokenizer version for ``alias``, or ``None`` when the alias is unmapped."""
        ...

    async def count(self, alias: str, segments: Sequence[str]) -> TokenCounts:
        """Token counts of each segment; raises ``UnmappedModel`` for an unmapped alias."""
        ...
