"""The per-request state machine over Envoy's ext_proc phases: events in, reply actions out.

Rules:
* one ``receive`` per Envoy message, answered by exactly one action (or ``NEED_CLASSIFICATION``
  first, then one action from ``resolve``); which events a state accepts is the ``_TABLE``
  below, anything else raises ``SessionStateError``;
* only ``POST`` to a path ending in ``/chat/completions`` (query excluded) is watched; anything
  else gets ``SkipRest`` and from then on every message is answered ``Continue`` untouched;
* a ``cacheBreakpoint`` query parameter is read on the request headers: a bad value ends the
  session with a ``Reject``, a good one is removed from the path (``RewritePath``);
* a request body that is not a JSON object is forwarded untouched; invalid markers, an
  unreadable marked body or an oversized body end the session with a ``Reject``;
* a request that cannot be classified (no bearer token, not JSON) is inactive at once;
* a 2xx JSON or SSE answer is watched when there is something to write: a classification to
  come or known active, or provider cache fields to scrub (``SessionPolicy.scrub``);
* the classification is asked for only at the end of a JSON body or at the first *final*
  SSE usage frame, never on response headers, and never while events before that frame wait
  in the same chunk: those go out first and the frame is held for the next message (or
  offered a classification that is already there); earlier usage frames never wait;
* SSE bytes come out exactly once, in order; only usage-bearing frames are rewritten; a
  partial event is held back until it completes or the stream ends;
* a committing verdict is decided only on the response's end of stream (or trailers); a
  non-2xx status vetoes at once; a session without a verdict commits nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.core import markers, query, request, sse, usage, verdict
from extproc.core.errors import BodyReadError, ClientError, SessionStateError
from extproc.core.model import Caller, Classification, PendingWrite, RequestPolicy
from extproc.core.phases import (
    CONTINUE,
    EVENT_TYPES,
    NEED_CLASSIFICATION,
    SKIP_REST,
    Action,
    Continue,
    EmitChunk,
    Event,
    NeedClassification,
    Reject,
    ReplaceBody,
    RequestBody,
    RequestHeaders,
    RequestTrailers,
    ResponseBody,
    ResponseHeaders,
    ResponseMode,
    ResponseTrailers,
    RewritePath,
    SkipRest,
    Step,
    WatchResponse,
)
from extproc.core.request import Prepared
from extproc.core.verdict import ResponseFacts, Verdict

CHAT_SUFFIX = "/chat/completions"
SSE_TYPE = "text/event-stream"


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """What the session needs from the configuration."""

    request: RequestPolicy = field(default_factory=RequestPolicy)
    max_body_bytes: int = 8 << 20
    caller_headers: frozenset[str] = frozenset()
    scrub: bool = True


@dataclass(frozen=True, slots=True)
class ClassifyJob:
    """What classify needs: the prepared request and who sent it."""

    prepared: Prepared
    caller: Caller


class State(enum.Enum):
    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    RESPONSE_HEADERS = "response_headers"
    JSON_BODY = "json_body"
    SSE_BODY = "sse_body"
    AWAIT_CLASSIFICATION = "await_classification"
    PASSTHROUGH = "passthrough"
    DONE = "done"


_Handler = Callable[["Session", Any], Step]


class Session:
    """One request's state; see the module rules."""

    def __init__(self, policy: SessionPolicy) -> None:
        self.policy = policy
        self.state = State.REQUEST_HEADERS
        self.is_chat = False
        self.prepared: Prepared | None = None
        self.rejected: ClientError | None = None
        self.classification: Classification | None = None
        self.verdict: Verdict | None = None
        self.status = 0
        self.request_id = ""
        self._caller = Caller(None)
        self._job: ClassifyJob | None = None
        self._job_taken = False
        self._mode: ResponseMode | None = None
        self._query_automatic = False
        self._sse = sse.SseStream()
        self._backlog: list[sse.SseEvent] = []
        self._out = bytearray()
        self._chunk = b""
        self._eos = False

    # ---- public API ----

    def receive(self, event: Event) -> Step:
        """Answer one Envoy message; raises ``SessionStateError`` when it is not legal now."""
        handler = _TABLE.get(self.state, {}).get(type(event))
        if handler is None:
            raise SessionStateError(f"{type(event).__name__} not allowed in {self.state.value}")
        return handler(self, event)

    def resolve(self, classification: Classification) -> Action:
        """Finish the step that returned ``NEED_CLASSIFICATION`` with ``classification``."""
        if self.state is not State.AWAIT_CLASSIFICATION:
            raise SessionStateError(f"no classification awaited in {self.state.value}")
        self.classification = classification
        if self._mode is ResponseMode.STREAMED:
            self.state = State.SSE_BODY
            step = self._drain_sse()
            assert not isinstance(step, NeedClassification), "classification is known now"
            return step
        self.state = State.JSON_BODY
        return self._finish_json()

    def offer(self, classification: Classification) -> None:
        """Hand over a classification that is ready before it was asked for."""
        if self._job is None or self.classification is not None:
            raise SessionStateError("no classification expected")
        self.classification = classification

    @property
    def wants_classification(self) -> bool:
        """Whether a classification can still be used (offered or resolved)."""
        return self._job is not None and self.classification is None and self.verdict is None

    def take_job(self) -> ClassifyJob | None:
        """The classify job, once, right after the request body was accepted."""
        if self._job_taken or self._job is None:
            return None
        self._job_taken = True
        return self._job

    @property
    def has_job(self) -> bool:
        return self._job is not None

    @property
    def is_awaiting_response(self) -> bool:
        """Whether a watched response is still to come or under way (no verdict yet)."""
        return self.state not in (State.PASSTHROUGH, State.DONE)

    @property
    def _known_inactive(self) -> bool:
        return self.classification is not None and self.classification.split is None

    @property
    def pending_commit(self) -> PendingWrite | None:
        """What to commit: only with a committing verdict and a non-empty pending write."""
        if self.verdict is None or not self.verdict.commit or self.classification is None:
            return None
        return self.classification.pending

    # ---- request side ----

    def _on_request_headers(self, event: RequestHeaders) -> Step:
        if not is_chat_request(event.method, event.path):
            self.state = State.PASSTHROUGH
            return SKIP_REST
        self.is_chat = True
        self.request_id = event.headers.get("x-request-id", "")[:128]
        self._caller = caller_from(event.headers, self.policy.caller_headers)
        try:
            param = query.read_breakpoint_param(event.path)
        except ClientError as err:
            return self._reject(err)
        self.state = State.RESPONSE_HEADERS if event.end_of_stream else State.REQUEST_BODY
        if param is None:
            return CONTINUE
        self._query_automatic = True
        return RewritePath(param.path)

    def _on_request_body(self, event: RequestBody) -> Step:
        if not event.end_of_stream:
            self.state = State.PASSTHROUGH  # not buffered: nothing here can be rewritten
            return CONTINUE
        self.state = State.RESPONSE_HEADERS
        try:
            prepared = self._prepare(event.body)
        except ClientError as err:
            return self._reject(err)
        if prepared is None:
            self.classification = Classification.inactive("not_json")
            return CONTINUE
        self.prepared = prepared
        if self._caller.bearer:
            self._job = ClassifyJob(prepared, self._caller)
        else:  # the outcome is inactive: nothing to classify
            self.classification = Classification.inactive("no_bearer")
        return ReplaceBody(prepared.body) if prepared.changed else CONTINUE

    def _prepare(self, body: bytes) -> Prepared | None:
        if len(body) > self.policy.max_body_bytes:
            raise BodyReadError(f"request body exceeds {self.policy.max_body_bytes} bytes")
        return request.prepare(body, self.policy.request, self._query_automatic)

    def _reject(self, err: ClientError) -> Reject:
        self.rejected = err
        self.state = State.DONE
        return Reject(400, markers.error_envelope(err), f"extproc_{err.code}")

    def _on_request_trailers(self, _event: RequestTrailers) -> Step:
        self.state = State.RESPONSE_HEADERS
        return CONTINUE

    # ---- response side ----

    def _on_response_headers(self, event: ResponseHeaders) -> Step:
        self.status = event.status
        if event.end_of_stream:
            self._decide(end_of_stream=True, usage_seen=False)
            self.state = State.DONE
            return CONTINUE
        mode = self._response_mode(event)
        if mode is None:
            if self._job is not None and not is_success(event.status):
                self._decide(end_of_stream=False, usage_seen=False)
            self.state = State.PASSTHROUGH
            return CONTINUE
        self._mode = mode
        self.state = State.SSE_BODY if mode is ResponseMode.STREAMED else State.JSON_BODY
        return WatchResponse(mode)

    def _response_mode(self, event: ResponseHeaders) -> ResponseMode | None:
        """Watch the body only when there is something to write and it can be edited.

        Something to write: a classification still to come or known active, or (scrubbing
        on) provider cache fields that an inactive answer must lose.
        """
        if not self.is_chat or not is_success(event.status):
            return None
        if self._known_inactive and not self.policy.scrub:
            return None
        media = media_type(event.content_type)
        if media == SSE_TYPE:
            return ResponseMode.STREAMED
        if media == "application/json" or media.endswith("+json"):
            return ResponseMode.BUFFERED
        return None

    def _on_json_body(self, event: ResponseBody) -> Step:
        if not event.end_of_stream:
            self.state = State.PASSTHROUGH  # Envoy did not buffer: leave it alone
            return CONTINUE
        self._chunk = event.chunk
        if self.classification is not None:
            return self._finish_json()
        self.state = State.AWAIT_CLASSIFICATION
        return NEED_CLASSIFICATION

    def _finish_json(self) -> Action:
        edit = usage.edit_json_body(self._chunk, self._rule)
        self._decide(
            end_of_stream=True,
            usage_seen=edit.usage_seen,
            error_seen=edit.error_seen,
        )
        self.state = State.DONE
        return CONTINUE if edit.body is self._chunk else ReplaceBody(edit.body)

    def _on_sse_body(self, event: ResponseBody) -> Step:
        self._chunk, self._eos = event.chunk, event.end_of_stream
        try:
            self._backlog += self._sse.feed(event.chunk)
        except sse.EventTooLarge as err:
            self._backlog.append(sse.SseEvent(err.pending))
        if self._eos:
            self._backlog += self._sse.flush()
        return self._drain_sse()

    def _drain_sse(self) -> Step:
        while self._backlog:
            event = self._backlog[0]
            if event.kind is sse.Kind.FINAL and self.classification is None:
                if self._out and not self._eos:
                    break  # send the tokens before it now; join on the next message
                self.state = State.AWAIT_CLASSIFICATION
                return NEED_CLASSIFICATION
            self._out += self._emit(self._backlog.pop(0))
        if self._eos:
            self._decide_sse(end_of_stream=True)
        return self._take_chunk()

    def _emit(self, event: sse.SseEvent) -> bytes:
        if event.kind not in sse.USAGE_KINDS:
            return event.raw
        return self._sse.edit_usage_event(event, self._rule)

    @property
    def _rule(self) -> usage.UsageRule:
        return usage.UsageRule.of(self.classification, self.policy.scrub)

    def _take_chunk(self) -> Action:
        out, self._out = bytes(self._out), bytearray()
        return CONTINUE if out == self._chunk else EmitChunk(out)

    def _on_sse_trailers(self, _event: ResponseTrailers) -> Step:
        self._decide_sse(end_of_stream=True)
        return CONTINUE

    def _decide_sse(self, end_of_stream: bool) -> None:
        facts = self._sse.facts
        self._decide(
            end_of_stream=end_of_stream,
            usage_seen=facts.usage_seen,
            error_seen=facts.error_seen,
            oversized=facts.oversized,
        )
        self.state = State.DONE

    def _decide(self, **facts: bool) -> None:
        self.verdict = verdict.decide(ResponseFacts(status=self.status, **facts))

    def _on_passthrough(self, _event: Event) -> Step:
        return CONTINUE


def is_chat_request(method: str, path: str) -> bool:
    """``POST`` to a path ending in ``/chat/completions``, query string excluded."""
    return method == "POST" and path.partition("?")[0].endswith(CHAT_SUFFIX)


def is_success(status: int) -> bool:
    return 200 <= status < 300


def media_type(content_type: str) -> str:
    """``text/event-stream; charset=utf-8`` → ``text/event-stream``."""
    return content_type.partition(";")[0].strip().lower()


def bearer_token(authorization: str | None) -> str | None:
    """The token of ``Bearer <t>`` or ``bearer <t>`` (value and token trimmed), else ``None``."""
    if authorization is None:
        return None
    authorization = authorization.lstrip()
    for scheme in ("Bearer ", "bearer "):
        if authorization.startswith(scheme):
            return authorization[len(scheme) :].strip() or None
    return None


def caller_from(headers: Mapping[str, str], keep: frozenset[str]) -> Caller:
    """The caller: its bearer token and only the headers the principal source reads."""
    kept = {name: value for name, value in headers.items() if name in keep}
    return Caller(bearer_token(headers.get("authorization")), kept)


_PASS_ALL: dict[type, _Handler] = dict.fromkeys(EVENT_TYPES, Session._on_passthrough)

# Which event each state accepts, and who handles it; everything else is a protocol error.
_TABLE: dict[State, dict[type, _Handler]] = {
    State.REQUEST_HEADERS: {RequestHeaders: Session._on_request_headers},
    State.REQUEST_BODY: {
        RequestBody: Session._on_request_body,
        RequestTrailers: Session._on_request_trailers,
        ResponseHeaders: Session._on_response_headers,  # a local reply (e.g. 413) before a body
    },
    State.RESPONSE_HEADERS: {ResponseHeaders: Session._on_response_headers},
    State.JSON_BODY: {ResponseBody: Session._on_json_body},
    State.SSE_BODY: {
        ResponseBody: Session._on_sse_body,
        ResponseTrailers: Session._on_sse_trailers,
    },
    State.AWAIT_CLASSIFICATION: {},
    State.PASSTHROUGH: _PASS_ALL,
    State.DONE: {},
}

__all__ = [
    "CHAT_SUFFIX",
    "CONTINUE",
    "EVENT_TYPES",
    "NEED_CLASSIFICATION",
    "SKIP_REST",
    "SSE_TYPE",
    "Action",
    "ClassifyJob",
    "Continue",
    "EmitChunk",
    "Event",
    "NeedClassification",
    "Reject",
    "ReplaceBody",
    "RequestBody",
    "RequestHeaders",
    "RequestTrailers",
    "ResponseBody",
    "ResponseHeaders",
    "ResponseMode",
    "ResponseTrailers",
    "RewritePath",
    "Session",
    "SessionPolicy",
    "SkipRest",
    "State",
    "Step",
    "WatchResponse",
    "bearer_token",
    "caller_from",
    "is_chat_request",
    "is_success",
    "media_type",
]
