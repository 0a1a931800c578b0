"""Prepare one chat-completions request body: parse once, validate, hash, strip.

Invariants:
* the body is parsed exactly once; a body that is not a JSON object yields ``None`` and is
  forwarded untouched (the upstream answers it);
* invalid markers raise ``MarkerError`` before anything else is decided;
* when nothing changed, ``Prepared.body`` is the very bytes object that came in;
* blocks, hashes and breakpoints come from one pass over the messages, before stripping.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.core import codec, markers, prefix
from extproc.core.model import PrefixHash, TierPolicy
from extproc.core.prefix import Block, Breakpoint


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request: the body to forward and what classify needs to know about it."""

    body: bytes
    changed: bool
    had_markers: bool
    model: str | None
    stream: bool
    blocks: tuple[Block, ...]
    hashes: tuple[PrefixHash, ...]
    breakpoints: tuple[Breakpoint, ...]


def prepare(raw: bytes, policy: TierPolicy) -> Prepared | None:
    """Parse and validate ``raw``; ``None`` when it is not a JSON object."""
    try:
        body = codec.loads(raw)
    except codec.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    scanned = prefix.scan(body.get("messages"), policy)
    stripped = markers.strip_markers(body)
    model = body.get("model")
    return Prepared(
        body=codec.dumps(body) if stripped.changed else raw,
        changed=stripped.changed,
        had_markers=stripped.had_markers,
        model=model if isinstance(model, str) else None,
        stream=body.get("stream") is True,
        blocks=scanned.blocks,
        hashes=scanned.hashes,
        breakpoints=scanned.breakpoints,
    )
