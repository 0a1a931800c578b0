"""The error hierarchy: client errors, upstream-format problems, dependency failures, bugs.

Foreign exceptions (psycopg, grpc, httpx) are mapped to these at the adapter boundary.
"""

from __future__ import annotations

import enum


class ExtprocError(Exception):
    """Base of every error this package raises on purpose."""


class RejectReason(enum.Enum):
    """Why a request's cache markers were rejected (the 400's reason)."""

    MALFORMED = "malformed_cache_control"
    UNSUPPORTED_TYPE = "unsupported_type"
    INVALID_TTL = "invalid_ttl"
    TIER_DISABLED = "tier_disabled"
    TOO_MANY_BREAKPOINTS = "too_many_breakpoints"


class ClientError(ExtprocError):
    """The client sent something we refuse; answered with the 400 envelope in one place."""

    code = "invalid_request_error"

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class MarkerError(ClientError):
    """Invalid ``cache_control`` markers (DESIGN §4.2)."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message, "invalid_cache_control", "messages[].content[].cache_control")
        self.reason = reason


class BodyReadError(ClientError):
    """The request body could not be read within the size limit."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "body_read_failed")


class UpstreamFormatError(ExtprocError):
    """The upstream's answer is not what we can edit: pass it through untouched."""


class DependencyError(ExtprocError):
    """A dependency (database, tokenizer) failed: degrade to no caching."""


class UnmappedModel(DependencyError):
    """The tokenizer has no mapping for the model alias."""


class SessionStateError(ExtprocError):
    """Envoy sent a message the session cannot accept in its state: a bug, fail the stream."""
