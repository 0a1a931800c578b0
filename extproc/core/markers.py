"""Validate and strip ``cache_control`` markers; force usage reporting on streams (DESIGN §4).

Rules:
* a marker lives on a content block (an element of a ``messages[i].content`` array);
* ``null`` or absent is no marker, anything else must be ``{"type": "ephemeral"}`` with an
  optional string ``ttl`` naming an enabled tier; a marker without ``ttl`` gets the default;
* at most ``MAX_BREAKPOINTS`` markers per request;
* every error message starts with its reason code, and ``error_envelope`` is the one place
  the 400 body is built;
* ``strip_markers`` removes every block's ``cache_control`` key (``null`` too) and nothing
  else, sets ``stream_options.include_usage`` on streams, and is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc.core import codec
from extproc.core.errors import ClientError, MarkerError, RejectReason
from extproc.core.model import Tier, TierPolicy

MAX_BREAKPOINTS = 4
MARKER_KEY = "cache_control"


def marker_tier(value: object, policy: TierPolicy, where: str) -> Tier | None:
    """The tier a marker asks for, ``None`` for no marker; raises ``MarkerError``.

    ``where`` names the block (e.g. ``messages[1].content[0]``) for the error message.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _reject(RejectReason.MALFORMED, f"{where}.cache_control must be an object or null")
    kind = value.get("type")
    if not isinstance(kind, str):
        raise _reject(RejectReason.MALFORMED, f"{where}.cache_control.type must be a string")
    if kind != "ephemeral":
        raise _reject(
            RejectReason.UNSUPPORTED_TYPE,
            f'{where}.cache_control.type {_quote(kind)} is not supported; use "ephemeral"',
        )
    if "ttl" not in value:
        return policy.default
    return _tier_of(value["ttl"], policy, where)


def _tier_of(ttl: object, policy: TierPolicy, where: str) -> Tier:
    if not isinstance(ttl, str):
        raise _reject(RejectReason.MALFORMED, f"{where}.cache_control.ttl must be a string")
    tier = Tier.parse(ttl)
    if tier is None:
        known = ", ".join(t.value for t in Tier)
        raise _reject(
            RejectReason.INVALID_TTL,
            f"{where}.cache_control.ttl {_quote(ttl)} is not a known tier ({known})",
        )
    if tier not in policy.enabled:
        raise _reject(
            RejectReason.TIER_DISABLED,
            f"{where}.cache_control.ttl {_quote(ttl)} is not enabled here; "
            f"available tiers: {policy.available()}",
        )
    return tier


def check_breakpoint_count(count: int) -> None:
    """Raise ``too_many_breakpoints`` when ``count`` exceeds ``MAX_BREAKPOINTS``."""
    if count > MAX_BREAKPOINTS:
        raise _reject(
            RejectReason.TOO_MANY_BREAKPOINTS,
            f"{count} cache_control breakpoints; at most {MAX_BREAKPOINTS} are allowed",
        )


def _reject(reason: RejectReason, detail: str) -> MarkerError:
    return MarkerError(reason, f"{reason.value}: {detail}")


def _quote(text: str) -> str:
    return codec.dumps(text).decode()


def error_envelope(err: ClientError) -> bytes:
    """The OpenAI-style 400 body for a client error."""
    error = {
        "message": err.message,
        "type": "invalid_request_error",
        "code": err.code,
        "param": err.param,
    }
    return codec.dumps({"error": error})


@dataclass(frozen=True, slots=True)
class Stripped:
    """What ``strip_markers`` found and did."""

    had_markers: bool
    changed: bool


def strip_markers(body: dict[str, Any]) -> Stripped:
    """Strip markers and force ``include_usage`` in place (``body`` is a freshly parsed copy)."""
    had_markers, removed = _strip_blocks(body.get("messages"))
    forced = _force_include_usage(body)
    return Stripped(had_markers=had_markers, changed=removed or forced)


def _strip_blocks(messages: object) -> tuple[bool, bool]:
    """(non-null marker seen, any key removed) over every content array."""
    had_markers = removed = False
    if not isinstance(messages, list):
        return had_markers, removed
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for block in content:
            if isinstance(block, dict) and MARKER_KEY in block:
                marker = block.pop(MARKER_KEY)
                had_markers = had_markers or marker is not None
                removed = True
    return had_markers, removed


def _force_include_usage(body: dict[str, Any]) -> bool:
    """Set ``stream_options.include_usage`` on a stream; a non-object option is left alone."""
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    if options is None:
        body["stream_options"] = {"include_usage": True}
        return True
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return False
    options["include_usage"] = True
    return True
