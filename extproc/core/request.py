"""Prepare one request body: read it once, validate, hash, strip (DESIGN §3, §4, §12).

Invariants:
* the body is read losslessly (``spans``) and never re-serialised: the forwarded body is the
  received bytes with the markers, telemetry blocks and ``include_usage`` edits spliced in, so
  every value we do not own reaches the upstream as the client sent it;
* when nothing changed, ``Prepared.body`` is the very bytes object that came in;
* a body that is not a JSON object is forwarded untouched, unless it may carry a marker we
  cannot read: then it is refused (``unreadable_body``), never forwarded with its markers;
* where the blocks and markers are is the dialect's (``dialects``, chat completions by
  default); everything after the layout is shared;
* invalid markers raise ``MarkerError``: block markers in block order first (a marker on a
  block that cannot carry one included), then the markers that place nothing, then the
  count, then the top-level (automatic) marker and its placement;
* a non-null top-level ``cache_control`` wins over the ``cacheBreakpoint`` query parameter;
* a body that cannot hold a marker or a telemetry block (neither their bytes nor an escaped
  ASCII character that could spell them) is not walked block by block: orjson tells its
  model and stream flag, and only the dialect's plain edit is made (chat: a stream's
  ``stream_options``; it has no blocks that matter: no breakpoint, nothing hashed);
  ``prepare_walked`` always walks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from extproc.core import codec, markers, spans
from extproc.core.dialects import chat
from extproc.core.dialects.api import Dialect
from extproc.core.dialects.blocks import Layout, Telemetry
from extproc.core.errors import BodyReadError, RejectReason
from extproc.core.model import PrefixHash, RequestPolicy, Tier
from extproc.core.prefix import Block, Breakpoint, prefix_hashes

AUTOMATIC_QUERY_TIER = Tier.H1
"""The tier ``cacheBreakpoint=lastUserMessage`` asks for."""

# A member name can be written with escapes ("cache\u005fcontrol"): an unreadable body with
# an escaped printable ASCII character may hide a marker as well as one that spells it (both
# are looked for in the UTF-8 form of a UTF-16 or UTF-32 body).
_ESCAPED_ASCII = re.compile(rb"\\u00[2-7][0-9a-fA-F]")
_ESCAPE_START = b"\\u00"  # a plain substring test first: far cheaper than the pattern
_MARKER_BYTES = markers.MARKER_KEY.encode()


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
    telemetry: tuple[Telemetry, ...] = ()
    route: str = chat.NAME


def prepare(
    raw: bytes,
    policy: RequestPolicy,
    query_automatic: bool = False,
    dialect: Dialect = chat.DIALECT,
) -> Prepared | None:
    """Read and validate ``raw``; ``None`` when it is not a JSON object (forward it untouched).

    ``query_automatic`` says the path carried ``cacheBreakpoint=lastUserMessage``.
    """
    if not query_automatic and not _may_hold_blocks_we_own(raw, policy):
        plain = _prepare_plain(raw, dialect)
        if not isinstance(plain, _Unread):
            return plain
    return prepare_walked(raw, policy, query_automatic, dialect)


def prepare_walked(
    raw: bytes,
    policy: RequestPolicy,
    query_automatic: bool = False,
    dialect: Dialect = chat.DIALECT,
) -> Prepared | None:
    """``prepare`` that always walks every block (``explain`` shows them all)."""
    text = spans.decode(raw)
    try:
        root = spans.read(text, dialect.shape)
    except spans.NotJson:
        _refuse_if_marked(raw)
        return None
    if not isinstance(root.value, dict):
        return None
    splice = spans.Splice()
    found = dialect.layout(root, policy, splice)
    blocks, points = _breakpoints(found, policy, query_automatic)
    model = root.value.get("model")
    return Prepared(
        body=spans.encode(splice.apply(text)) if splice else raw,
        changed=bool(splice),
        had_markers=bool(points) or found.top_marker is not None or query_automatic,
        model=model if isinstance(model, str) else None,
        stream=root.value.get("stream") is True,
        blocks=blocks,
        hashes=prefix_hashes(blocks),
        breakpoints=points,
        telemetry=found.telemetry,
        route=dialect.name,
    )


class _Unread:
    """The fast path could not read the body: take the lossless one."""


_UNREAD = _Unread()


def _may_name_a_marker(data: bytes) -> bool:
    """Whether ``data`` spells ``cache_control``, or has an escape that could spell it."""
    if _MARKER_BYTES in data:
        return True
    return _ESCAPE_START in data and _ESCAPED_ASCII.search(data) is not None


def _may_hold_blocks_we_own(raw: bytes, policy: RequestPolicy) -> bool:
    """Whether ``raw`` may carry a marker or a telemetry block (so it must be walked)."""
    if _may_name_a_marker(raw):
        return True
    return any(prefix.encode() in raw for prefix in policy.telemetry_prefixes)


def _prepare_plain(raw: bytes, dialect: Dialect) -> Prepared | _Unread | None:
    """A body without markers or telemetry: its model and stream flag, and the usage edit."""
    try:
        doc = codec.loads(raw)
    except codec.JSONDecodeError:
        return _UNREAD  # perhaps a value only the lossless reader reads
    if not isinstance(doc, dict):
        return None
    model, stream = doc.get("model"), doc.get("stream") is True
    body = dialect.plain_body(raw, stream)
    return Prepared(
        body=body,
        changed=body is not raw,
        had_markers=False,
        model=model if isinstance(model, str) else None,
        stream=stream,
        blocks=(),
        hashes=(),
        breakpoints=(),
        route=dialect.name,
    )


def _breakpoints(
    found: Layout, policy: RequestPolicy, query_automatic: bool
) -> tuple[tuple[Block, ...], tuple[Breakpoint, ...]]:
    """The blocks with their explicit tiers, and every breakpoint (automatic one included)."""
    tiers = [_site_tier(site.marker, site.markable, site.kind, policy) for site in found.sites]
    for marker in found.loose:
        markers.marker_tier(marker, policy.tiers)
    explicit = [Breakpoint(i, tier) for i, tier in enumerate(tiers) if tier is not None]
    markers.check_breakpoint_count(len(explicit))
    blocks = tuple(
        Block(s.role, s.kind, s.text, s.body, s.where, tier)
        for s, tier in zip(found.sites, tiers, strict=True)
    )
    automatic = _automatic_tier(found.top_marker, policy, query_automatic)
    if automatic is None:
        return blocks, tuple(explicit)
    placed = markers.place_automatic(automatic, tiers)
    if placed.block is None:
        return blocks, tuple(explicit)
    return blocks, (*explicit, Breakpoint(placed.block, placed.tier, automatic=True))


def _site_tier(marker: object, markable: bool, kind: str, policy: RequestPolicy) -> Tier | None:
    if marker is not None and not markable:
        raise markers.refuse_marker_on(kind)
    return markers.marker_tier(marker, policy.tiers)


def _automatic_tier(top: object, policy: RequestPolicy, query_automatic: bool) -> Tier | None:
    if top is not None:
        return markers.marker_tier(top, policy.tiers)
    if query_automatic:
        return markers.require_enabled(AUTOMATIC_QUERY_TIER, policy.tiers)
    return None


def _refuse_if_marked(raw: bytes) -> None:
    """Refuse an unreadable body that may carry a marker: another parser might read it."""
    if _may_name_a_marker(_as_utf8(raw)):
        raise BodyReadError(
            "request body is not valid JSON; cache_control markers can only be read in a "
            "valid UTF-8 JSON body",
            RejectReason.UNREADABLE_BODY,
        )


def _as_utf8(raw: bytes) -> bytes:
    """``raw``, re-encoded as UTF-8 when it is JSON in UTF-16 or UTF-32 (RFC 4627 detection).

    Undecodable units become U+FFFD, so a stray byte cannot hide the rest of the body.
    """
    if b"\x00" not in raw[:4]:
        return raw
    try:
        return raw.decode(codec.detect_encoding(raw), "replace").encode("utf-8")
    except LookupError:
        return raw
