"""What Envoy sends (events), how a session answers (actions) and what each step means (effects).

Invariants:
* events, actions and effects are plain values: no protobuf, no I/O; ``adapters.proto`` maps
  events and actions, the pump acts on effects;
* every action answers exactly one event; ``NEED_CLASSIFICATION`` is not an answer but a
  request to join the classification first;
* a ``Turn`` is one step's answer and effects: the pump never reads the session's state to
  learn what happened.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from extproc.core.errors import ClientError
from extproc.core.model import Caller, Classification, PendingWrite
from extproc.core.request import Prepared
from extproc.core.verdict import Verdict, VetoReason

# ---- events (what Envoy sent) ----


@dataclass(frozen=True, slots=True)
class RequestHeaders:
    path: str
    method: str
    headers: Mapping[str, str] = field(default_factory=dict)
    end_of_stream: bool = False


@dataclass(frozen=True, slots=True)
class RequestBody:
    """A request body; ``attributes`` when Envoy skipped the request headers (body first)."""

    body: bytes
    end_of_stream: bool = True
    attributes: Mapping[str, str] | None = None


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
    """A response body chunk; ``status`` when Envoy skipped the response headers."""

    chunk: bytes
    end_of_stream: bool = False
    status: int | None = None


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


# ---- effects (what a step means for the rest of the server) ----


@dataclass(frozen=True, slots=True)
class ClassifyJob:
    """What classify needs: the prepared request and who sent it."""

    prepared: Prepared
    caller: Caller


@dataclass(frozen=True, slots=True)
class StartClassify:
    """Start classifying now, so it overlaps the upstream call."""

    job: ClassifyJob


@dataclass(frozen=True, slots=True)
class RequestRead:
    """A chat request body was read; ``had_markers`` for the adoption metric."""

    had_markers: bool


@dataclass(frozen=True, slots=True)
class Classified:
    """The session knew the outcome without classifying (no bearer token, not JSON)."""

    classification: Classification


@dataclass(frozen=True, slots=True)
class Rejected:
    """The request was refused with the 400 envelope."""

    error: ClientError


@dataclass(frozen=True, slots=True)
class Settled:
    """The response's verdict; ``pending`` is what to commit (``None``: nothing).

    ``accounted`` says whether the request was being accounted (a veto counts only then);
    ``classification`` and ``usage`` (the upstream's final usage object, if one was seen) are
    what the accounting record is built from (``record``).
    """

    verdict: Verdict
    pending: PendingWrite | None
    accounted: bool
    classification: Classification | None = None
    usage: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class UsageSent:
    """A stream's final usage went out before its end: the record so far, in case it is cut.

    ``usage`` is the upstream's usage object; the verdict (``Settled``) comes at the end.
    """

    classification: Classification | None
    usage: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Unwatched:
    """A chat request's 2xx answer passes unedited: nothing of it is seen, nothing commits.

    ``classification`` is what was known by its response headers (``None``: not yet).
    """

    classification: Classification | None


@dataclass(frozen=True, slots=True)
class Ended:
    """The stream ended; ``veto`` when an accounted response never reached its verdict."""

    veto: VetoReason | None


Effect = StartClassify | RequestRead | Classified | Rejected | Settled | UsageSent | Unwatched


@dataclass(frozen=True, slots=True)
class Turn:
    """One step's answer (or the request to join first) and its effects, in order."""

    step: Step
    effects: tuple[Effect, ...] = ()
