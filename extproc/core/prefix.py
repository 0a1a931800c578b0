"""Blocks, cumulative prefix hashes, breakpoints and walk-back candidates (DESIGN §3).

Invariants:
* a string ``content`` is one text block ``{"type":"text","text":s}``; an array contributes
  one block per element; anything else contributes nothing;
* hash *i* is SHA-256 over ``role_utf8 + b"\\x00" + canonical(block)`` for blocks 0..i, with
  only the block's own top-level ``cache_control`` left out, so markers never change a hash;
* the hashes of a prefix of the messages are a prefix of the hashes;
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
class Element:
    """One raw block as it appears in the request, with where it came from."""

    role: str
    value: Any
    message_index: int
    content_index: int | None


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


def elements(messages: object) -> Iterator[Element]:
    """Every block of ``messages`` in order; malformed messages contribute nothing."""
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        role = role if isinstance(role, str) else ""
        content = message.get("content")
        if isinstance(content, str):
            yield Element(role, {"type": "text", "text": content}, i, None)
        elif isinstance(content, list):
            for j, value in enumerate(content):
                yield Element(role, value, i, j)


def build_blocks(messages: object, policy: TierPolicy) -> tuple[Block, ...]:
    """The blocks of ``messages`` with validated markers; raises ``MarkerError``."""
    blocks = tuple(_block(element, policy) for element in elements(messages))
    markers.check_breakpoint_count(sum(1 for block in blocks if block.tier is not None))
    return blocks


def _block(element: Element, policy: TierPolicy) -> Block:
    value = element.value
    if not isinstance(value, dict):
        return Block(element.role, "", "", None)
    kind = value.get("type")
    text = value.get("text")
    return Block(
        role=element.role,
        kind=kind if isinstance(kind, str) else "",
        text=text if isinstance(text, str) else "",
        tier=_tier(element, policy),
    )


def _tier(element: Element, policy: TierPolicy) -> Tier | None:
    marker = element.value.get(markers.MARKER_KEY)
    if marker is None:
        return None
    where = f"messages[{element.message_index}].content[{element.content_index}]"
    return markers.marker_tier(marker, policy, where)


def hash_input(element: Element) -> bytes:
    """The bytes one block adds to the running hash."""
    value = element.value
    if isinstance(value, dict) and markers.MARKER_KEY in value:
        value = {k: v for k, v in value.items() if k != markers.MARKER_KEY}
    return element.role.encode() + b"\x00" + codec.canonical(value)


def prefix_hashes(messages: object) -> tuple[PrefixHash, ...]:
    """The cumulative prefix hash after each block of ``messages``."""
    running = hashlib.sha256()
    hashes = []
    for element in elements(messages):
        running.update(hash_input(element))
        hashes.append(PrefixHash(running.copy().digest()))
    return tuple(hashes)


def breakpoints(blocks: Sequence[Block]) -> tuple[Breakpoint, ...]:
    """The marked blocks in order."""
    return tuple(Breakpoint(i, b.tier) for i, b in enumerate(blocks) if b.tier is not None)


def walkback_candidates(
    points: Sequence[Breakpoint], hashes: Sequence[PrefixHash]
) -> tuple[Candidate, ...]:
    """Each breakpoint's block and the 19 before it (clipped at 0), once each, deepest first."""
    indices: set[int] = set()
    for point in points:
        indices.update(range(max(0, point.block - WALKBACK + 1), point.block + 1))
    return tuple(Candidate(i, hashes[i]) for i in sorted(indices, reverse=True))
