"""Blocks, cumulative prefix hashes, breakpoints and walk-back candidates (DESIGN §3).

Invariants:
* a block's hash body is ``canonical(block)`` with only the block's own top-level
  ``cache_control`` left out, so markers never change a hash; a string ``content`` hashes as
  the text block ``{"type":"text","text":s}``;
* hash *i* is SHA-256 over ``role_utf8 + b"\\x00" + body`` for blocks 0..i, so the hashes of a
  prefix of the blocks are a prefix of the hashes;
* walk-back candidates are unique per block and never reach below block 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.core import codec
from extproc.core.model import PrefixHash, Tier

WALKBACK = 20
"""Boundaries looked up per breakpoint: the breakpoint's own and the 19 before it."""

MARKER_KEY = "cache_control"


@dataclass(frozen=True, slots=True)
class Block:
    """A block as classify and ``explain`` see it.

    ``text`` is what is tokenized, ``body`` what is hashed, ``where`` its place for people
    (e.g. ``messages[1].content[0]``) and ``tier`` its explicit marker's tier.
    """

    role: str
    kind: str
    text: str
    body: bytes
    where: str
    tier: Tier | None = None


@dataclass(frozen=True, slots=True)
class Breakpoint:
    """A block carrying a valid, non-null marker (``automatic``: placed by automatic caching)."""

    block: int
    tier: Tier
    automatic: bool = False


@dataclass(frozen=True, slots=True)
class Candidate:
    """A prefix hash to look up, tagged with the block it ends at."""

    block: int
    prefix_hash: PrefixHash


def object_body(value: Mapping[str, Any]) -> bytes:
    """The hash body of a block object: canonical JSON without its own ``cache_control``."""
    if MARKER_KEY in value:
        value = {k: v for k, v in value.items() if k != MARKER_KEY}
    return codec.canonical(value)


def string_body(text: str) -> bytes:
    """The hash body of a string content: the text block it stands for."""
    return b'{"text":' + codec.canonical(text) + b',"type":"text"}'


def value_body(value: Any) -> bytes:
    """The hash body of any block value (objects lose their own marker)."""
    return object_body(value) if isinstance(value, dict) else codec.canonical(value)


def prefix_hashes(blocks: Iterable[Block]) -> tuple[PrefixHash, ...]:
    """The cumulative prefix hash after each block."""
    running = hashlib.sha256()
    hashes = []
    for block in blocks:
        running.update(block.role.encode("utf-8", "surrogatepass") + b"\x00" + block.body)
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
