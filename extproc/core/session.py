"""The per-request state machine over Envoy's ext_proc phases: events in, turns out.

Rules:
* one ``receive`` per Envoy message, answered by one ``Turn``: an action (or
  ``NEED_CLASSIFICATION`` first, then the action from ``resolve``) and the step's effects; which
  events a state accepts is the ``_TABLE`` below, anything else raises ``SessionStateError``;
* three layouts are accepted: request headers first, or the request body first with the
  request facts in its attributes (``route.RequestLine``), and response headers, or the first
  response body chunk with the status (then the answer is streamed: SSE, or JSON held whole);
* only a ``POST`` that a dialect serves (``dialects.for_request``: ``…/chat/completions``,
  ``…/v1/messages``, ``…/v1/responses``, query excluded) is watched; anything else is
  answered ``SkipRest`` (headers first) or ``Continue`` from then on, untouched; the session
  never looks inside a body itself: the dialect reads the request and its answer;
* on a dialect that takes it (chat), a ``cacheBreakpoint`` query parameter is read on the
  request headers: a bad value is a ``Reject``, a good one is removed from the path
  (``RewritePath``); body first, the path cannot change, so the parameter is refused there;
  elsewhere the parameter is not ours and goes upstream as sent;
* a request body that is not a JSON object is forwarded untouched; invalid markers, an
  unreadable marked body or an oversized body are a ``Reject``; a request that cannot be
  classified (no bearer token, not JSON) is inactive at once (``Classified``);
* a 2xx JSON or SSE answer is watched when there is something to write: a classification to
  come or known active, or provider cache fields to scrub (``SessionPolicy.scrub``);
* the classification is asked for only at the end of a JSON answer or at the first final SSE
  usage frame (``answers``), never on response headers;
* the verdict (``Settled``) is decided only on the response's end of stream (or trailers); a
  non-2xx status vetoes at once; ``end`` reports the veto of a stream cut short;
* ``Settled`` carries the classification and the upstream's final usage (what the accounting
  record is built from); a stream's first final usage frame sent before its end is
  ``UsageSent`` (a record in case the stream is cut); a chat request's 2xx answer that is not
  watched is ``Unwatched``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.core import defaults, dialects, query, request, route, usage, verdict
from extproc.core.answers import SseAnswer, looks_like_sse
from extproc.core.dialects import Answer, Dialect
from extproc.core.errors import BodyReadError, BreakpointParamError, ClientError, SessionStateError
from extproc.core.model import Caller, Classification, RequestPolicy
from extproc.core.phases import (
    CONTINUE,
    EVENT_TYPES,
    NEED_CLASSIFICATION,
    SKIP_REST,
    Action,
    Classified,
    ClassifyJob,
    Effect,
    EmitChunk,
    Ended,
    Event,
    Reject,
    Rejected,
    ReplaceBody,
    RequestBody,
    RequestHeaders,
    RequestRead,
    RequestTrailers,
    ResponseBody,
    ResponseHeaders,
    ResponseMode,
    ResponseTrailers,
    RewritePath,
    Settled,
    StartClassify,
    Step,
    Turn,
    Unwatched,
    UsageSent,
    WatchResponse,
)
from extproc.core.request import Prepared
from extproc.core.verdict import ResponseFacts, VetoReason


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """What the session needs from the configuration."""

    request: RequestPolicy = field(default_factory=RequestPolicy)
    max_body_bytes: int = defaults.MAX_BODY_BYTES
    caller_headers: frozenset[str] = frozenset()
    scrub: bool = True

    @property
    def attribute_headers(self) -> frozenset[str]:
        """The headers read from attributes when the request headers are skipped."""
        return self.caller_headers | route.TOKEN_HEADERS


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
_NOT_JSON = Classification.inactive("not_json")
_NO_BEARER = Classification.inactive("no_bearer")


class Session:
    """One request's state; see the module rules."""

    def __init__(self, policy: SessionPolicy) -> None:
        self.policy = policy
        self.state = State.REQUEST_HEADERS
        self.request_id = ""
        self.classification: Classification | None = None
        self._dialect: Dialect | None = None
        self._answer: Answer | None = None
        self._stream: bool | None = None  # the request's stream flag, once read
        self._caller = Caller(None)
        self._accounted = False
        self._settled = False
        self._status = 0
        self._query_automatic = False
        self._effects: list[Effect] = []
        self._sse: SseAnswer | None = None
        self._held: list[bytes] = []
        self._json_streamed = False
        self._usage_sent = False

    # ---- public API ----

    def receive(self, event: Event) -> Turn:
        """Answer one Envoy message; raises ``SessionStateError`` when it is not legal now."""
        handler = _TABLE[self.state].get(type(event))
        if handler is None:
            raise SessionStateError(f"{type(event).__name__} not allowed in {self.state.value}")
        return self._turn(handler(self, event))

    def resolve(self, classification: Classification) -> Turn:
        """Finish the step that returned ``NEED_CLASSIFICATION`` with ``classification``."""
        if self.state is not State.AWAIT_CLASSIFICATION:
            raise SessionStateError(f"no classification awaited in {self.state.value}")
        self.classification = classification
        if self._sse is not None:
            self.state = State.SSE_BODY
            return self._turn(self._drain_sse())
        self.state = State.JSON_BODY
        return self._turn(self._finish_json())

    def offer(self, classification: Classification) -> None:
        """Hand over a classification that is ready before it was asked for."""
        if not self.wants_classification:
            raise SessionStateError("no classification expected")
        self.classification = classification

    @property
    def dialect(self) -> Dialect | None:
        """The API the request speaks, once known."""
        return self._dialect

    @property
    def wants_classification(self) -> bool:
        """Whether a classification can still be used (offered or resolved)."""
        return self._accounted and self.classification is None and not self._settled

    def end(self) -> Ended:
        """The stream ended: the veto when an accounted response never reached its verdict."""
        cut = self._accounted and not self._settled and self.state is not State.PASSTHROUGH
        return Ended(VetoReason.NO_END_OF_STREAM if cut else None)

    def _turn(self, step: Step) -> Turn:
        effects, self._effects = tuple(self._effects), []
        return Turn(step, effects) if effects else Turn(step)

    # ---- request side ----

    def _on_request_headers(self, event: RequestHeaders) -> Step:
        line = route.RequestLine(event.method, event.path, event.headers)
        opened = self._open(line)
        if opened is not CONTINUE:
            return opened
        try:
            param = self._breakpoint_param(event.path)
        except ClientError as err:
            return self._reject(err)
        self.state = State.RESPONSE_HEADERS if event.end_of_stream else State.REQUEST_BODY
        if param is None:
            return CONTINUE
        self._query_automatic = True
        return RewritePath(param.path)

    def _breakpoint_param(self, path: str) -> query.BreakpointParam | None:
        assert self._dialect is not None
        return query.read_breakpoint_param(path) if self._dialect.breakpoint_param else None

    def _open(self, line: route.RequestLine) -> Step:
        dialect = dialects.for_request(line.method, line.path)
        if dialect is None:
            self.state = State.PASSTHROUGH
            return SKIP_REST
        self._dialect = dialect
        self._answer = dialect.answer()
        self.request_id = line.request_id
        self._caller = line.caller(self.policy.caller_headers)
        return CONTINUE

    def _on_body_first(self, event: RequestBody) -> Step:
        if event.attributes is None:
            raise SessionStateError("request body first, without request attributes")
        line = route.RequestLine.from_attributes(event.attributes, self.policy.attribute_headers)
        if self._open(line) is not CONTINUE:
            return CONTINUE  # not ours: a body reply cannot skip the rest
        assert self._dialect is not None
        if self._dialect.breakpoint_param and query.PARAM in line.path.partition("?")[2]:
            return self._reject(
                BreakpointParamError(f"{query.PARAM} is not supported on this route")
            )
        return self._on_request_body(event)

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
            self._classified(_NOT_JSON)
            return CONTINUE
        self._stream = prepared.stream  # the body and its blocks go with the classification
        self._effects.append(RequestRead(prepared.had_markers))
        if self._caller.bearer:
            self._accounted = True
            self._effects.append(StartClassify(ClassifyJob(prepared, self._caller)))
        else:
            self._classified(_NO_BEARER)
        return ReplaceBody(prepared.body) if prepared.changed else CONTINUE

    def _prepare(self, body: bytes) -> Prepared | None:
        if len(body) > self.policy.max_body_bytes:
            raise BodyReadError(f"request body exceeds {self.policy.max_body_bytes} bytes")
        assert self._dialect is not None
        return request.prepare(body, self.policy.request, self._query_automatic, self._dialect)

    def _classified(self, classification: Classification) -> None:
        self.classification = classification
        self._effects.append(Classified(classification))

    def _reject(self, err: ClientError) -> Reject:
        assert self._dialect is not None
        self.state = State.DONE
        self._effects.append(Rejected(err))
        return Reject(400, self._dialect.error_envelope(err), f"extproc_{err.code}")

    def _on_request_trailers(self, _event: RequestTrailers) -> Step:
        self.state = State.RESPONSE_HEADERS
        return CONTINUE

    # ---- response side ----

    def _on_response_headers(self, event: ResponseHeaders) -> Step:
        self._status = event.status
        if event.end_of_stream:
            return self._settle(end_of_stream=True, usage_seen=False)
        mode = self._watch(event.status, route.media_type(event.content_type))
        if mode is None:
            return self._unwatched(event.status)
        if mode is ResponseMode.STREAMED:
            self._sse = SseAnswer(self._reader)
        self.state = State.SSE_BODY if mode is ResponseMode.STREAMED else State.JSON_BODY
        return WatchResponse(mode)

    def _watch(self, status: int, media: str) -> ResponseMode | None:
        """The body mode when there is something to write and it can be edited, else ``None``."""
        if self._dialect is None or not route.is_success(status) or not self._worth_watching:
            return None
        if media == route.SSE_TYPE:
            return ResponseMode.STREAMED
        if media == "application/json" or media.endswith("+json"):
            return ResponseMode.BUFFERED
        return None

    @property
    def _worth_watching(self) -> bool:
        known_inactive = self.classification is not None and self.classification.split is None
        return self.policy.scrub or not known_inactive

    def _unwatched(self, status: int) -> Step:
        self.state = State.PASSTHROUGH
        if self._accounted and not route.is_success(status):
            self._settle(end_of_stream=False, usage_seen=False)
            self.state = State.PASSTHROUGH
        elif self._dialect is not None and route.is_success(status):
            self._effects.append(Unwatched(self.classification))
        return CONTINUE

    def _on_streamed_answer(self, event: ResponseBody) -> Step:
        """Response headers skipped: the first chunk says the status; the answer is streamed."""
        if event.status is None:
            raise SessionStateError("response body before response headers, without a status")
        self._status = event.status
        if self._dialect is None or not route.is_success(self._status) or not self._worth_watching:
            return self._unwatched(self._status)
        if looks_like_sse(event.chunk) and self._stream is not False:
            self._sse = SseAnswer(self._reader)
            self.state = State.SSE_BODY
            return self._on_sse_body(event)
        self.state = State.JSON_BODY
        self._json_streamed = True
        return self._on_json_body(event)

    def _on_json_body(self, event: ResponseBody) -> Step:
        if not event.end_of_stream and not self._json_streamed:
            self.state = State.PASSTHROUGH  # Envoy did not buffer: leave it alone
            return CONTINUE
        self._held.append(event.chunk)
        if not event.end_of_stream:
            return EmitChunk(b"")  # streamed JSON: held until it is whole
        if self.classification is not None:
            return self._finish_json()
        self.state = State.AWAIT_CLASSIFICATION
        return NEED_CLASSIFICATION

    def _finish_json(self) -> Action:
        whole = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        edit = usage.edit_json_body(whole, self._rule, self._reader.edit_body)
        self._settle(
            edit.usage, end_of_stream=True, usage_seen=edit.usage_seen, error_seen=edit.error_seen
        )
        if self._json_streamed:
            return (
                EmitChunk(edit.body) if len(self._held) > 1 or edit.body is not whole else CONTINUE
            )
        return CONTINUE if edit.body is whole else ReplaceBody(edit.body)

    def _on_sse_body(self, event: ResponseBody) -> Step:
        assert self._sse is not None
        self._sse.feed(event.chunk, event.end_of_stream)
        return self._drain_sse()

    def _drain_sse(self) -> Step:
        answer = self._sse
        assert answer is not None
        out = answer.drain(self.classification is not None, self._rule)
        if out is None:
            self.state = State.AWAIT_CLASSIFICATION
            return NEED_CLASSIFICATION
        if answer.ended:
            self._settle_stream()
        elif not self._usage_sent and answer.final_usage is not None:
            self._usage_sent = True
            self._effects.append(UsageSent(self.classification, answer.final_usage))
        return CONTINUE if out == answer.chunk else EmitChunk(out)

    def _on_sse_trailers(self, _event: ResponseTrailers) -> Step:
        self._settle_stream()
        return CONTINUE

    @property
    def _rule(self) -> usage.UsageRule:
        tiers = self.policy.request.tiers.enabled
        return usage.UsageRule.of(self.classification, self.policy.scrub, tiers)

    @property
    def _reader(self) -> Answer:
        assert self._answer is not None
        return self._answer

    def _settle_stream(self) -> None:
        assert self._sse is not None
        facts = self._sse.facts
        self._settle(
            self._sse.final_usage,
            end_of_stream=True,
            usage_seen=facts.usage_seen,
            error_seen=facts.error_seen,
            oversized=facts.oversized,
            completed=facts.completed,
        )

    def _settle(self, seen: Mapping[str, Any] | None = None, **facts: bool) -> Step:
        """Decide the verdict; ``seen`` is the upstream's final usage object, if any."""
        decided = verdict.decide(ResponseFacts(status=self._status, **facts))
        pending = None
        if decided.commit and self.classification is not None:
            pending = self.classification.pending
        self._settled = True
        self.state = State.DONE
        classification = self.classification
        self._effects.append(Settled(decided, pending, self._accounted, classification, seen))
        return CONTINUE

    def _on_passthrough(self, _event: Event) -> Step:
        return CONTINUE

    def _on_unknown_request(self, _event: ResponseHeaders) -> Step:
        self.state = State.PASSTHROUGH
        return CONTINUE


_PASS_ALL: dict[type, _Handler] = dict.fromkeys(EVENT_TYPES, Session._on_passthrough)

# Which event each state accepts, and who handles it; everything else is a protocol error.
_TABLE: dict[State, dict[type, _Handler]] = {
    State.REQUEST_HEADERS: {
        RequestHeaders: Session._on_request_headers,
        RequestBody: Session._on_body_first,  # request headers skipped
        # Request headers skipped and no body message: a bodiless request, or a local reply
        # (e.g. Envoy's 413) before the body. Nothing is known about the request: not ours.
        ResponseHeaders: Session._on_unknown_request,
    },
    State.REQUEST_BODY: {
        RequestBody: Session._on_request_body,
        RequestTrailers: Session._on_request_trailers,
        ResponseHeaders: Session._on_response_headers,  # a local reply (e.g. 413) before a body
    },
    State.RESPONSE_HEADERS: {
        ResponseHeaders: Session._on_response_headers,
        ResponseBody: Session._on_streamed_answer,  # response headers skipped
    },
    State.JSON_BODY: {ResponseBody: Session._on_json_body},
    State.SSE_BODY: {
        ResponseBody: Session._on_sse_body,
        ResponseTrailers: Session._on_sse_trailers,
    },
    State.AWAIT_CLASSIFICATION: {},
    State.PASSTHROUGH: _PASS_ALL,
    State.DONE: {},
}
