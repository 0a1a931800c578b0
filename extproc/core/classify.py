"""Classify one prepared request: which prefix tokens are a cache read, which a write (DESIGN §3).

Rules:
* unknown caller, missing or disabled model, or a failing resolver: inactive;
* enabled model but nothing to account (unmapped tokenizer, no markers, below the floor,
  count mismatch, a failing index or tokenizer): zero-active;
* a request without any marker asks neither the tokenizer nor the index; with engine reports
  on (``EngineCache.REPORT``) its read is the engine's own, taken from the response;
* one index lookup for every walk-back candidate of every breakpoint; the deepest hit is the
  read and is refreshed on commit;
* one tokenization of the blocks after the read up to the deepest breakpoint, none when the
  read reaches it;
* every breakpoint beyond the read becomes an entry; its creation is the tokens since the
  previous boundary, in its own tier;
* only ``DependencyError`` degrades; anything else is a bug and propagates.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from extproc.core.errors import DependencyError
from extproc.core.model import (
    CacheEntry,
    Caller,
    Classification,
    IndexHit,
    ModelConfig,
    Outcome,
    PendingWrite,
    PrincipalId,
    Scope,
    Split,
    Tier,
    TokenCounts,
)
from extproc.core.ports import ModelConfigResolver, PrefixIndex, PrincipalResolver, Tokenizer
from extproc.core.prefix import Breakpoint, Candidate, walkback_candidates
from extproc.core.request import Prepared


class EngineCache(enum.Enum):
    """What the engine's own cache numbers mean for a request without markers (§3.0.2)."""

    IGNORE = "off"
    REPORT = "report"


@dataclass(frozen=True, slots=True)
class ClassifyPorts:
    """The ports classify asks through, and how to treat the engine's cache numbers."""

    principals: PrincipalResolver
    models: ModelConfigResolver
    index: PrefixIndex
    tokenizer: Tokenizer
    engine_cache: EngineCache = EngineCache.IGNORE


@dataclass(frozen=True, slots=True)
class _Read:
    """The deepest index hit: the block it ends at (-1 for none) and the hit."""

    block: int
    hit: IndexHit | None

    @property
    def tokens(self) -> int:
        return self.hit.cumulative_token_count if self.hit is not None else 0


_NO_READ = _Read(-1, None)


async def classify(request: Prepared, caller: Caller, ports: ClassifyPorts) -> Classification:
    """The outcome, split and pending write of ``request`` for ``caller``."""
    if not caller.bearer:
        return Classification.inactive("no_bearer")
    if request.model is None:
        return Classification.inactive("no_model")
    try:
        config = await ports.models.model_config(request.model)
        if config is None:
            return Classification.inactive("model_disabled")
        principal = await ports.principals.resolve(caller)
    except DependencyError:
        return Classification.inactive("dependency_error")
    if principal is None:
        return Classification.inactive("unknown_principal")
    try:
        return await _classify_enabled(request, request.model, config, principal, ports)
    except DependencyError:
        return Classification.zero("dependency_error", request.model, principal)


async def _classify_enabled(
    request: Prepared,
    alias: str,
    config: ModelConfig,
    principal: PrincipalId,
    ports: ClassifyPorts,
) -> Classification:
    if not request.breakpoints:
        if not request.had_markers and ports.engine_cache is EngineCache.REPORT:
            return Classification.engine_read(alias, principal)
        return Classification.zero("no_markers", alias, principal)
    version = await ports.tokenizer.version(alias)
    if version is None:
        return Classification.zero("tokenizer_unmapped", alias, principal)
    scope = Scope(principal, alias, version)
    candidates = walkback_candidates(request.breakpoints, request.hashes)
    hits = await ports.index.lookup(scope, [c.prefix_hash for c in candidates])
    read = _deepest_read(candidates, hits)
    deepest = request.breakpoints[-1].block
    if read.block >= deepest:
        return _result(scope, read, (), Split(read=read.tokens))
    return await _with_writes(request, config, scope, read, ports.tokenizer)


def _deepest_read(candidates: Sequence[Candidate], hits: Sequence[IndexHit]) -> _Read:
    """The hit at the deepest candidate block (candidates come deepest first)."""
    by_hash = {hit.prefix_hash: hit for hit in hits}
    for candidate in candidates:
        hit = by_hash.get(candidate.prefix_hash)
        if hit is not None:
            return _Read(candidate.block, hit)
    return _NO_READ


async def _with_writes(
    request: Prepared, config: ModelConfig, scope: Scope, read: _Read, tokenizer: Tokenizer
) -> Classification:
    start, stop = read.block + 1, request.breakpoints[-1].block + 1
    texts = [block.text for block in request.blocks[start:stop]]
    counts = await tokenizer.count(scope.virtual_model, texts)
    if not _counts_match(counts, scope, len(texts)):
        return Classification.zero("count_mismatch", scope.virtual_model, scope.principal_id)
    cumulative = _cumulative(read.tokens, start, counts.segment_counts)
    if cumulative[stop - 1] < config.min_prefix_tokens:
        if read.hit is None:
            return Classification.zero("below_floor", scope.virtual_model, scope.principal_id)
        return _result(scope, read, (), Split(read=read.tokens), reason="below_floor")
    entries, creation = _writes(request, read, cumulative)
    return _result(scope, read, entries, Split(read=read.tokens, creation=creation))


def _counts_match(counts: TokenCounts, scope: Scope, segments: int) -> bool:
    """The counts come from the scope's tokenizer and cover every segment."""
    return (
        counts.tokenizer_version == scope.tokenizer_version
        and len(counts.segment_counts) == segments
    )


def _cumulative(base: int, start: int, counts: Sequence[int]) -> dict[int, int]:
    """Cumulative prefix tokens after each counted block, keyed by block index."""
    totals: dict[int, int] = {}
    running = base
    for offset, count in enumerate(counts):
        running += count
        totals[start + offset] = running
    return totals


def _writes(
    request: Prepared, read: _Read, cumulative: Mapping[int, int]
) -> tuple[tuple[CacheEntry, ...], dict[Tier, int]]:
    """One entry per breakpoint beyond the read; creation per tier since the previous one."""
    entries: list[CacheEntry] = []
    creation: dict[Tier, int] = {}
    previous = read.tokens
    for point in _beyond(request.breakpoints, read.block):
        total = cumulative[point.block]
        entries.append(CacheEntry(request.hashes[point.block], total, point.tier))
        creation[point.tier] = creation.get(point.tier, 0) + total - previous
        previous = total
    return tuple(entries), creation


def _beyond(points: Sequence[Breakpoint], block: int) -> list[Breakpoint]:
    return [point for point in points if point.block > block]


def _result(
    scope: Scope,
    read: _Read,
    entries: tuple[CacheEntry, ...],
    split: Split,
    reason: str = "",
) -> Classification:
    pending = PendingWrite(scope, entries, read.hit)
    return Classification(
        outcome=_outcome(read.hit is not None, bool(entries)),
        split=split,
        pending=None if pending.is_empty else pending,
        reason=reason,
        model=scope.virtual_model,
        principal=scope.principal_id,
    )


def _outcome(has_read: bool, has_writes: bool) -> Outcome:
    if has_read and has_writes:
        return Outcome.READ_AND_CREATE
    if has_read:
        return Outcome.READ
    if has_writes:
        return Outcome.CREATE_ONLY
    return Outcome.ZERO_ACTIVE
