"""Blocks, cumulative prefix hashes, breakpoints and walk-back candidates (DESIGN §3).

Invariants:
* a string ``content`` is one text block ``{"type":"text","text":s}``; an array contributes
  one block per element; anything else contributes nothing;
* hash *i* is SHA-256 over ``role_utf8 + b"\\x00" + canonical(block)`` for blocks 0..i, with
  only the block's own top-level ``cache_control`` left out, so markers never change a hash;
* the hashes of a prefix of the messages are a prefix of the hashes;
* ``scan`` validates every marker and allows at most ``markers.MAX_BREAKPOINTS``;
* walk-back candidates are unique per block and never reach below block 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.core import codec, markers
from extproc.core.model import PrefixHash, Tier, TierPolicy

WALKBACK = 20
"""Boundaries looked up per breakpoint: the breakpoint's own and the 19 before it."""


@dataclass(frozen=True, slots=True)
class Block:
    """A block as classify and ``explain`` see it: role, kind, text to tokenize, marker tier."""

    role: str
    kind: str
    text: str
    tier: Tier | None


@dataclass(frozen=True, slots=True)
class Breakpoint:
    """A block carrying a valid, non-null marker."""

    block: int
    tier: Tier


@dataclass(frozen=True, slots=True)
class Candidate:
    """A prefix hash to look up, tagged with the block it ends at."""

    block: int
    prefix_hash: PrefixHash


@dataclass(frozen=True, slots=True)
class Scan:
    """Everything one pass over the messages learns: blocks, prefix hashes, breakpoints."""

    blocks: tuple[Block, ...]
    hashes: tuple[PrefixHash, ...]
    breakpoints: tuple[Breakpoint, ...]


_Raw = tuple[str, Any, int, int]
"""A raw block: role, the element (or the string content), message and content index."""

_STRING = -1
"""The content index of a string content, which is a block of its own."""


def _walk(messages: object) -> Iterator[_Raw]:
    """Every raw block of ``messages`` in order; malformed messages contribute nothing."""
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        role = role if isinstance(role, str) else ""
        content = message.get("content")
        if isinstance(content, str):
            yield role, content, i, _STRING
        elif isinstance(content, list):
            for j, value in enumerate(content):
                yield role, value, i, j


def scan(messages: object, policy: TierPolicy) -> Scan:
    """Blocks with validated markers, prefix hashes and breakpoints; raises ``MarkerError``."""
    running = hashlib.sha256()
    blocks: list[Block] = []
    hashes: list[PrefixHash] = []
    points: list[Breakpoint] = []
    for raw in _walk(messages):
        block = _block(raw, policy)
        if block.tier is not None:
            points.append(Breakpoint(len(blocks), block.tier))
        blocks.append(block)
        running.update(_hash_input(raw))
        hashes.append(PrefixHash(running.copy().digest()))
    markers.check_breakpoint_count(len(points))
    return Scan(tuple(blocks), tuple(hashes), tuple(points))


def _block(raw: _Raw, policy: TierPolicy) -> Block:
    role, value, i, j = raw
    if j == _STRING:
        return Block(role, "text", value, None)
    if not isinstance(value, dict):
        return Block(role, "", "", None)
    kind = value.get("type")
    text = value.get("text")
    marker = value.get(markers.MARKER_KEY)
    return Block(
        role=role,
        kind=kind if isinstance(kind, str) else "",
        text=text if isinstance(text, str) else "",
        tier=None if marker is None else _tier(marker, policy, i, j),
    )


def _tier(marker: object, policy: TierPolicy, i: int, j: int) -> Tier | None:
    return markers.marker_tier(marker, policy, f"messages[{i}].content[{j}]")


def _hash_input(raw: _Raw) -> bytes:
    """The bytes one block adds to the running hash."""
    role, value, _, j = raw
    if j == _STRING:
        # canonical({"type": "text", "text": value}) without building the dict
        body = b'{"text":' + codec.canonical(value) + b',"type":"text"}'
    elif isinstance(value, dict) and markers.MARKER_KEY in value:
        body = codec.canonical({k: v for k, v in value.items() if k != markers.MARKER_KEY})
    else:
        body = codec.canonical(value)
    return role.encode() + b"\x00" + body


def prefix_hashes(messages: object) -> tuple[PrefixHash, ...]:
    """The cumulative prefix hash after each block of ``messages`` (markers not validated)."""
    running = hashlib.sha256()
    hashes = []
    for raw in _walk(messages):
        running.update(_hash_input(raw))
        hashes.append(PrefixHash(running.copy().digest()))
    return tuple(hashes)


def walkback_candidates(
    points: Sequence[Breakpoint], hashes: Sequence[PrefixHash]
) -> tuple[Candidate, ...]:
    """Each breakpoint's block and the 19 before it (clipped at 0), once each, deepest first."""
    indices: set[int] = set()
    for point in points:
        indices.update(range(max(0, point.block - WALKBACK + 1), point.block + 1))
    return tuple(Candidate(i, hashes[i]) for i in sorted(indices, reverse=True))
