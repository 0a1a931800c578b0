"""What Envoy sends in each ext_proc phase (events) and how a session answers (actions).

Invariants:
* events and actions are plain values: no protobuf, no I/O; ``adapters.proto`` maps them;
* every action answers exactly one event; ``NEED_CLASSIFICATION`` is not an answer but a
  request to join the classification first.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

# ---- events (what Envoy sent) ----


@dataclass(frozen=True, slots=True)
class RequestHeaders:
    path: str
    method: str
    headers: Mapping[str, str] = field(default_factory=dict)
    end_of_stream: bool = False


@dataclass(frozen=True, slots=True)
class RequestBody:
    body: bytes
    end_of_stream: bool = True


@dataclass(frozen=True, slots=True)
class RequestTrailers:
    pass


@dataclass(frozen=True, slots=True)
class ResponseHeaders:
    status: int
    content_type: str = ""
    end_of_stream: bool = False


@dataclass(frozen=True, slots=True)
class ResponseBody:
    chunk: bytes
    end_of_stream: bool = False


@dataclass(frozen=True, slots=True)
class ResponseTrailers:
    pass


EVENT_TYPES = (
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
)
Event = (
    RequestHeaders
    | RequestBody
    | RequestTrailers
    | ResponseHeaders
    | ResponseBody
    | ResponseTrailers
)

# ---- actions (how to answer it) ----


class Continue(enum.Enum):
    """Answer the message unchanged."""

    CONTINUE = "continue"


class SkipRest(enum.Enum):
    """Answer ``Continue`` and tell Envoy to send nothing more for this request."""

    SKIP_REST = "skip_rest"


class NeedClassification(enum.Enum):
    """No answer yet: join the classification and hand it to ``Session.resolve``."""

    NEED_CLASSIFICATION = "need_classification"


CONTINUE: Final = Continue.CONTINUE
SKIP_REST: Final = SkipRest.SKIP_REST
NEED_CLASSIFICATION: Final = NeedClassification.NEED_CLASSIFICATION


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """Replace a whole buffered body (request or JSON response); content-length follows it."""

    body: bytes


@dataclass(frozen=True, slots=True)
class RewritePath:
    """Continue the request headers with ``:path`` replaced (a query parameter removed)."""

    path: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the client directly (the 400 envelope); the request is never forwarded."""

    status: int
    body: bytes
    details: str


class ResponseMode(enum.Enum):
    """How Envoy should send the response body (a response-headers mode override)."""

    BUFFERED = "buffered"
    STREAMED = "streamed"


@dataclass(frozen=True, slots=True)
class WatchResponse:
    """Continue, and switch the response body to ``mode`` (STREAMED drops content-length)."""

    mode: ResponseMode


@dataclass(frozen=True, slots=True)
class EmitChunk:
    """Replace this streamed chunk with ``data`` (empty: hold everything back for now)."""

    data: bytes


Action = Continue | SkipRest | RewritePath | ReplaceBody | Reject | WatchResponse | EmitChunk
Step = Action | NeedClassification
