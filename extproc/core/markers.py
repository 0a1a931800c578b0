"""Validate ``cache_control`` markers and place the automatic breakpoint (DESIGN §3.0.1, §4).

Rules:
* ``null`` or absent is no marker; anything else must be ``{"type": "ephemeral"}`` with an
  optional string ``ttl`` naming an enabled tier; a marker without ``ttl`` gets the default;
* at most ``MAX_BREAKPOINTS`` explicit markers per request, counted before automatic caching
  is placed;
* the automatic breakpoint goes on the last block: a no-op when that block has an explicit
  marker of the same tier, a conflict for another tier, and refused when the explicit markers
  have used every slot;
* the messages are the reference's word for word (clients and dashboards match on them), and
  ``error_envelope`` is the one place the 400 body is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extproc.core import codec
from extproc.core.errors import ClientError, MarkerError, RejectReason
from extproc.core.model import Tier, TierPolicy

MAX_BREAKPOINTS = 4
MARKER_KEY = "cache_control"

MALFORMED_MESSAGE = (
    'cache_control must be an object with a string "type": "ephemeral" '
    '(and an optional string "ttl")'
)
CONFLICT_MESSAGE = (
    "top-level cache_control ttl conflicts with the explicit cache_control on the last block"
)
NO_SLOT_MESSAGE = (
    f"no breakpoint slot left for automatic caching (all {MAX_BREAKPOINTS} used by explicit "
    "markers)"
)


def marker_tier(value: object, policy: TierPolicy) -> Tier | None:
    """The tier a marker asks for, ``None`` for no marker; raises ``MarkerError``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MarkerError(RejectReason.MALFORMED, MALFORMED_MESSAGE)
    kind = value.get("type")
    if not isinstance(kind, str):
        raise MarkerError(RejectReason.MALFORMED, MALFORMED_MESSAGE)
    if kind != "ephemeral":
        raise MarkerError(
            RejectReason.UNSUPPORTED_TYPE,
            f'unsupported cache_control type: {codec.quote(kind)} (only "ephemeral")',
        )
    if "ttl" not in value:
        return policy.default
    return _tier_of(value["ttl"], policy)


def _tier_of(ttl: object, policy: TierPolicy) -> Tier:
    if not isinstance(ttl, str):
        raise MarkerError(RejectReason.MALFORMED, MALFORMED_MESSAGE)
    tier = Tier.parse(ttl)
    if tier is None:
        raise MarkerError(
            RejectReason.INVALID_TTL, f"invalid cache_control ttl: {codec.quote(ttl)}"
        )
    return require_enabled(tier, policy)


def require_enabled(tier: Tier, policy: TierPolicy) -> Tier:
    """``tier``, or ``tier_disabled`` when this deployment does not offer it."""
    if tier not in policy.enabled:
        raise MarkerError(
            RejectReason.TIER_DISABLED,
            f"cache_control ttl tier '{tier.value}' is not currently available; "
            f"available tiers: {policy.available()}",
        )
    return tier


def refuse_marker_on(kind: str) -> MarkerError:
    """The error for a marker on a block type that cannot carry one (a ``thinking`` block)."""
    return MarkerError(
        RejectReason.MARKER_NOT_ALLOWED,
        f"cache_control cannot be set on a {codec.quote(kind)} block",
    )


def check_breakpoint_count(count: int) -> None:
    """Raise ``too_many_breakpoints`` when ``count`` exceeds ``MAX_BREAKPOINTS``."""
    if count > MAX_BREAKPOINTS:
        raise MarkerError(
            RejectReason.TOO_MANY_BREAKPOINTS,
            f"too many cache_control breakpoints (max {MAX_BREAKPOINTS})",
        )


@dataclass(frozen=True, slots=True)
class Placement:
    """Where automatic caching puts its breakpoint: ``block`` is ``None`` for a no-op."""

    block: int | None
    tier: Tier


def place_automatic(tier: Tier, tiers: Sequence[Tier | None]) -> Placement:
    """The automatic breakpoint of ``tier`` given each block's explicit tier (in block order).

    Raises ``automatic_ttl_conflict`` or ``automatic_no_slot``; with no blocks it is a no-op.
    """
    if not tiers:
        return Placement(None, tier)
    last = tiers[-1]
    if last is not None:
        if last is not tier:
            raise MarkerError(RejectReason.AUTOMATIC_TTL_CONFLICT, CONFLICT_MESSAGE)
        return Placement(None, tier)
    if sum(t is not None for t in tiers) >= MAX_BREAKPOINTS:
        raise MarkerError(RejectReason.AUTOMATIC_NO_SLOT, NO_SLOT_MESSAGE)
    return Placement(len(tiers) - 1, tier)


def error_envelope(err: ClientError) -> bytes:
    """The OpenAI-style 400 body for a client error."""
    error = {
        "message": err.message,
        "type": "invalid_request_error",
        "code": err.code,
        "param": err.param,
    }
    return codec.dumps({"error": error})
