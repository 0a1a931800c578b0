"""The error hierarchy: client errors, upstream-format problems, dependency failures, bugs.

Foreign exceptions (psycopg, grpc, httpx) are mapped to these at the adapter boundary.
"""

from __future__ import annotations

import enum


class ExtprocError(Exception):
    """Base of every error this package raises on purpose."""


class RejectReason(enum.Enum):
    """Why a request was refused before forwarding (the 400's reason; a metric label)."""

    MALFORMED = "malformed_cache_control"
    UNSUPPORTED_TYPE = "unsupported_type"
    INVALID_TTL = "invalid_ttl"
    TIER_DISABLED = "tier_disabled"
    TOO_MANY_BREAKPOINTS = "too_many_breakpoints"
    AUTOMATIC_TTL_CONFLICT = "automatic_ttl_conflict"
    AUTOMATIC_NO_SLOT = "automatic_no_slot"
    MARKER_NOT_ALLOWED = "marker_not_allowed"
    INVALID_CACHE_BREAKPOINT = "invalid_cache_breakpoint"
    UNREADABLE_BODY = "unreadable_body"
    BODY_READ_FAILED = "body_read_failed"


class ClientError(ExtprocError):
    """The client sent something we refuse; answered with the 400 envelope in one place."""

    def __init__(
        self, reason: RejectReason, message: str, code: str, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.code = code
        self.param = param


class MarkerError(ClientError):
    """Invalid ``cache_control`` markers (DESIGN §4.2)."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(reason, message, "invalid_cache_control", "cache_control")


class BreakpointParamError(ClientError):
    """An unsupported ``cacheBreakpoint`` query parameter value (DESIGN §3.0.1)."""

    def __init__(self, message: str) -> None:
        super().__init__(
            RejectReason.INVALID_CACHE_BREAKPOINT,
            message,
            "invalid_cache_breakpoint",
            "cacheBreakpoint",
        )


class BodyReadError(ClientError):
    """The request body could not be read: over the size limit, or markers not readable."""

    def __init__(self, message: str, reason: RejectReason = RejectReason.BODY_READ_FAILED) -> None:
        super().__init__(reason, message, reason.value)


class UpstreamFormatError(ExtprocError):
    """The upstream's answer is not what we can edit: pass it through untouched."""


class DependencyError(ExtprocError):
    """A dependency (database, tokenizer) failed: degrade to no caching."""


class UnmappedModel(DependencyError):
    """The tokenizer has no mapping for the model alias."""


class SessionStateError(ExtprocError):
    """Envoy sent a message the session cannot accept in its state: a bug, fail the stream."""
