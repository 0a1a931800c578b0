"""The session state machine: every phase sequence Envoy can send, and the ones it cannot."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.core import codec
from extproc.core import phases as s
from extproc.core.errors import ClientError, SessionStateError
from extproc.core.model import (
    CacheEntry,
    Classification,
    Outcome,
    PendingWrite,
    PrefixHash,
    PrincipalId,
    RequestPolicy,
    Scope,
    Split,
    Tier,
    TierPolicy,
)
from extproc.core.request import Prepared
from extproc.core.route import bearer_token
from extproc.core.session import Session, SessionPolicy
from extproc.core.verdict import Verdict, VetoReason


class Driven:
    """A session driven like the pump drives it: steps out, effects recorded in order."""

    def __init__(self, policy: SessionPolicy) -> None:
        self.session = Session(policy)
        self.effects: list[s.Effect] = []
        self._jobs_taken = 0

    def receive(self, event: s.Event) -> s.Step:
        return self._take(self.session.receive(event))

    def resolve(self, classification: Classification) -> s.Step:
        return self._take(self.session.resolve(classification))

    def offer(self, classification: Classification) -> None:
        self.session.offer(classification)

    @property
    def wants_classification(self) -> bool:
        return self.session.wants_classification

    def _take(self, turn: s.Turn) -> s.Step:
        self.effects += turn.effects
        return turn.step

    def _of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.effects if isinstance(e, kind)]

    def take_job(self) -> s.ClassifyJob | None:
        starts = self._of(s.StartClassify)
        if len(starts) <= self._jobs_taken:
            return None
        self._jobs_taken += 1
        job: s.ClassifyJob = starts[-1].job
        return job

    @property
    def has_job(self) -> bool:
        return bool(self._of(s.StartClassify))

    @property
    def prepared(self) -> Prepared | None:
        starts = self._of(s.StartClassify)
        return starts[-1].job.prepared if starts else None

    @property
    def rejected(self) -> ClientError | None:
        found = self._of(s.Rejected)
        return found[-1].error if found else None

    @property
    def verdict(self) -> Verdict | None:
        found = self._of(s.Settled)
        return found[-1].verdict if found else None

    @property
    def pending_commit(self) -> PendingWrite | None:
        found = self._of(s.Settled)
        return found[-1].pending if found else None

    @property
    def is_awaiting_response(self) -> bool:
        """Whether the stream ending now would cut an accounted response short."""
        return self.session.end().veto is not None


CHAT = "/v1/chat/completions"
AUTH = {"authorization": "Bearer sk-test", "x-tenant": "t1", "cookie": "c"}
SCOPE = Scope(PrincipalId("p"), "m", "v1")
PENDING = PendingWrite(SCOPE, (CacheEntry(PrefixHash(b"\x01" * 32), 12, Tier.M5),), None)
ACTIVE = Classification(
    Outcome.CREATE_ONLY, Split(0, {Tier.M5: 12}), PENDING, model="m"
)  # fmt: skip
INACTIVE = Classification.inactive("deadline_exceeded")
USAGE = {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}
PROVIDER_USAGE = {
    **USAGE,
    "prompt_tokens_details": {"cached_tokens": 16},
    "prompt_cache_hit_tokens": 16,
}


def body(**fields: Any) -> bytes:
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return codec.dumps(doc)


MARKED = body(
    messages=[
        {
            "role": "system",
            "content": [{"type": "text", "text": "static", "cache_control": {"type": "ephemeral"}}],
        },
        {"role": "user", "content": "hi"},
    ]
)


def verdict_of(session: Driven) -> Verdict:
    assert session.verdict is not None
    return session.verdict


def wants(session: Driven) -> bool:
    """``wants_classification`` read through a call, so mypy does not keep an old narrowing."""
    return session.wants_classification


def new_session(**policy: Any) -> Driven:
    return Driven(SessionPolicy(**policy))


def open_chat(raw: bytes = MARKED, headers: dict[str, str] | None = None) -> Driven:
    """A session that has accepted the request headers and ``raw`` as the request body."""
    session = new_session(caller_headers=frozenset({"x-tenant"}))
    assert (
        session.receive(s.RequestHeaders(CHAT, "POST", AUTH if headers is None else headers))
        is s.CONTINUE
    )
    session.receive(s.RequestBody(raw))
    return session


def sse(*events: bytes) -> bytes:
    return b"".join(b"data: " + e + b"\n\n" for e in events)


CHUNK = codec.dumps({"choices": [{"delta": {"content": "hi"}}]})
USAGE_FRAME = codec.dumps({"choices": [], "usage": USAGE})
STREAM = sse(CHUNK, CHUNK, USAGE_FRAME, b"[DONE]")


# ---- request side ----


@pytest.mark.parametrize(
    ("method", "path", "chat"),
    [
        pytest.param("POST", CHAT, True, id="chat"),
        pytest.param("POST", "/openai/v1/chat/completions", True, id="prefixed"),
        pytest.param("POST", CHAT + "?api-version=1", True, id="query-excluded"),
        pytest.param("GET", CHAT, False, id="get"),
        pytest.param("POST", "/v1/completions", False, id="completions"),
        pytest.param("POST", "/v1/chat/completions/x", False, id="suffix-after"),
        pytest.param("POST", "/v1/models?p=/chat/completions", False, id="suffix-in-query"),
    ],
)
def test_cacheability_is_decided_on_request_headers(method: str, path: str, chat: bool) -> None:
    session = new_session()
    step = session.receive(s.RequestHeaders(path, method, AUTH))
    assert step is (s.CONTINUE if chat else s.SKIP_REST)


def test_non_chat_passes_every_later_message_untouched() -> None:
    session = new_session()
    assert session.receive(s.RequestHeaders("/v1/models", "GET")) is s.SKIP_REST
    later: list[s.Event] = [
        s.RequestBody(b"x"),
        s.ResponseHeaders(200, "text/plain"),
        s.ResponseBody(b"y", True),
    ]
    assert [session.receive(e) for e in later] == [s.CONTINUE] * 3
    assert session.take_job() is None
    assert session.verdict is None


@pytest.mark.parametrize(
    ("header", "bearer"),
    [
        pytest.param("Bearer sk-1", "sk-1", id="Bearer"),
        pytest.param("bearer  sk-1 ", "sk-1", id="bearer-trimmed"),
        pytest.param(" \tBearer sk-1\t ", "sk-1", id="value-surrounded-by-whitespace"),
        pytest.param("  bearer\tsk-1", None, id="tab-is-not-the-scheme-separator"),
        pytest.param("Basic abc", None, id="basic"),
        pytest.param("Bearer ", None, id="empty"),
        pytest.param("BEARER sk-1", None, id="upper-scheme"),
    ],
)
def test_bearer_token(header: str, bearer: str | None) -> None:
    assert bearer_token(header) == bearer


def test_job_carries_bearer_and_only_configured_headers() -> None:
    session = open_chat()
    job = session.take_job()
    assert job is not None
    assert job.caller.bearer == "sk-test"
    assert dict(job.caller.headers) == {"x-tenant": "t1"}
    assert session.take_job() is None  # handed out once


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"{not json", s.CONTINUE, id="invalid-json"),
        pytest.param(b"[1, 2]", s.CONTINUE, id="not-an-object"),
        pytest.param(body(), s.CONTINUE, id="nothing-to-strip"),
    ],
)
def test_request_body_forwarded_untouched(raw: bytes, expected: s.Action) -> None:
    session = new_session()
    session.receive(s.RequestHeaders(CHAT, "POST", AUTH))
    assert session.receive(s.RequestBody(raw)) is expected


def test_invalid_json_has_no_job_and_no_watched_error_response() -> None:
    session = open_chat(b"{oops")
    assert session.take_job() is None
    assert session.receive(s.ResponseHeaders(400, "application/json")) is s.CONTINUE


def test_unreadable_marked_body_is_refused() -> None:
    session = open_chat(b'{"messages": [{"cache_control": {"type": "ephemeral"}} oops')
    assert session.rejected is not None
    assert session.rejected.reason.value == "unreadable_body"


def test_markers_are_stripped_and_body_replaced() -> None:
    session = new_session()
    session.receive(s.RequestHeaders(CHAT, "POST", AUTH))
    step = session.receive(s.RequestBody(MARKED))
    assert isinstance(step, s.ReplaceBody)
    assert b"cache_control" not in step.body
    assert session.prepared is not None
    assert session.prepared.had_markers


def test_include_usage_forced_on_streams() -> None:
    session = new_session()
    session.receive(s.RequestHeaders(CHAT, "POST", AUTH))
    step = session.receive(s.RequestBody(body(stream=True)))
    assert isinstance(step, s.ReplaceBody)
    assert codec.loads(step.body)["stream_options"] == {"include_usage": True}


REJECTED = [
    pytest.param({"type": "persistent"}, "unsupported cache_control type", id="unsupported-type"),
    pytest.param({"type": "ephemeral", "ttl": "2h"}, "invalid cache_control ttl", id="bad-ttl"),
    pytest.param("yes", "cache_control must be an object", id="malformed"),
    pytest.param({"type": "ephemeral", "ttl": "24h"}, "cache_control ttl tier", id="disabled"),
]


@pytest.mark.parametrize(("marker", "message"), REJECTED)
def test_bad_markers_get_the_400_envelope(marker: object, message: str) -> None:
    session = new_session(request=RequestPolicy(TierPolicy(frozenset({Tier.M5, Tier.H1}))))
    session.receive(s.RequestHeaders(CHAT, "POST", AUTH))
    block = {"type": "text", "text": "x", "cache_control": marker}
    step = session.receive(s.RequestBody(body(messages=[{"role": "user", "content": [block]}])))
    assert isinstance(step, s.Reject)
    assert (step.status, step.details) == (400, "extproc_invalid_cache_control")
    error = codec.loads(step.body)["error"]
    assert error["code"] == "invalid_cache_control"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "cache_control"
    assert error["message"].startswith(message)
    assert session.take_job() is None
    with pytest.raises(SessionStateError):
        session.receive(s.ResponseHeaders(200, "application/json"))


def test_oversized_body_is_rejected() -> None:
    session = new_session(max_body_bytes=64)
    session.receive(s.RequestHeaders(CHAT, "POST", AUTH))
    step = session.receive(s.RequestBody(body(pad="x" * 100)))
    assert isinstance(step, s.Reject)
    assert codec.loads(step.body)["error"]["code"] == "body_read_failed"


def test_without_bearer_the_answer_is_only_scrubbed() -> None:
    session = open_chat(headers={})
    assert session.take_job() is None
    assert session.receive(s.ResponseHeaders(200, "application/json")) == s.WatchResponse(
        s.ResponseMode.BUFFERED
    )
    scrubbed = session.receive(s.ResponseBody(json_response(usage=PROVIDER_USAGE), True))
    assert isinstance(scrubbed, s.ReplaceBody)
    assert codec.loads(scrubbed.body)["usage"] == {
        **USAGE,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert session.pending_commit is None


def test_without_bearer_and_without_scrubbing_the_answer_is_not_watched() -> None:
    session = new_session(scrub=False)
    session.receive(s.RequestHeaders(CHAT, "POST", {}))
    session.receive(s.RequestBody(MARKED))
    assert session.receive(s.ResponseHeaders(200, "application/json")) is s.CONTINUE


PARAM_PATHS = [
    pytest.param(CHAT + "?cacheBreakpoint=lastUserMessage", CHAT, id="only-param"),
    pytest.param(CHAT + "?a=1&cacheBreakpoint=lastUserMessage&b=2", CHAT + "?a=1&b=2", id="kept"),
    pytest.param(
        CHAT + "?cacheBreakpoint=lastUserMessage&cacheBreakpoint=x", CHAT, id="first-decides"
    ),
]


@pytest.mark.parametrize(("path", "forwarded"), PARAM_PATHS)
def test_breakpoint_param_is_removed_and_places_the_automatic_breakpoint(
    path: str, forwarded: str
) -> None:
    session = new_session()
    assert session.receive(s.RequestHeaders(path, "POST", AUTH)) == s.RewritePath(forwarded)
    session.receive(s.RequestBody(body()))
    assert session.prepared is not None
    assert [(p.block, p.tier, p.automatic) for p in session.prepared.breakpoints] == [
        (0, Tier.H1, True)
    ]


def test_bad_breakpoint_param_is_refused_on_request_headers() -> None:
    session = new_session()
    step = session.receive(s.RequestHeaders(CHAT + "?cacheBreakpoint=LastUserMessage", "POST"))
    assert isinstance(step, s.Reject)
    error = codec.loads(step.body)["error"]
    assert error == {
        "message": 'invalid cacheBreakpoint value "LastUserMessage"; supported values: '
        '"lastUserMessage"',
        "type": "invalid_request_error",
        "code": "invalid_cache_breakpoint",
        "param": "cacheBreakpoint",
    }
    with pytest.raises(SessionStateError):
        session.receive(s.RequestBody(body()))


# ---- JSON responses ----


def json_response(**extra: Any) -> bytes:
    return codec.dumps({"id": "c1", "choices": [], "usage": USAGE, **extra})


def test_json_usage_injected_after_joining_at_end_of_body() -> None:
    session = open_chat()
    step = session.receive(s.ResponseHeaders(200, "application/json; charset=utf-8"))
    assert step == s.WatchResponse(s.ResponseMode.BUFFERED)
    assert session.receive(s.ResponseBody(json_response(), True)) is s.NEED_CLASSIFICATION
    assert session.verdict is None
    step = session.resolve(ACTIVE)
    assert isinstance(step, s.ReplaceBody)
    usage = codec.loads(step.body)["usage"]
    assert usage["cache_creation_input_tokens"] == 12
    assert usage["prompt_tokens"] == 20
    assert verdict_of(session).commit
    assert session.pending_commit == PENDING


def test_json_inactive_leaves_body_untouched_and_commits_nothing() -> None:
    session = open_chat()
    session.receive(s.ResponseHeaders(200, "application/json"))
    session.receive(s.ResponseBody(json_response(), True))
    assert session.resolve(INACTIVE) is s.CONTINUE
    assert session.pending_commit is None


def test_json_inactive_loses_provider_cache_fields() -> None:
    session = open_chat()
    session.receive(s.ResponseHeaders(200, "application/json"))
    session.receive(s.ResponseBody(json_response(usage=PROVIDER_USAGE), True))
    step = session.resolve(INACTIVE)
    assert isinstance(step, s.ReplaceBody)
    usage = codec.loads(step.body)["usage"]
    assert "prompt_cache_hit_tokens" not in usage
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


def test_json_active_replaces_provider_cache_fields() -> None:
    session = open_chat()
    session.receive(s.ResponseHeaders(200, "application/json"))
    session.receive(s.ResponseBody(json_response(usage=PROVIDER_USAGE), True))
    step = session.resolve(ACTIVE)
    assert isinstance(step, s.ReplaceBody)
    usage = codec.loads(step.body)["usage"]
    assert "prompt_cache_hit_tokens" not in usage
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["cache_creation_input_tokens"] == 12


def test_known_inactive_is_watched_for_scrubbing() -> None:
    session = open_chat()
    session.offer(INACTIVE)
    step = session.receive(s.ResponseHeaders(200, "application/json"))
    assert step == s.WatchResponse(s.ResponseMode.BUFFERED)
    assert session.receive(s.ResponseBody(json_response(), True)) is s.CONTINUE
    assert session.pending_commit is None


@pytest.mark.parametrize(
    ("response", "veto"),
    [
        pytest.param(codec.dumps({"choices": []}), VetoReason.NO_USAGE, id="no-usage"),
        pytest.param(
            json_response(error={"message": "x"}), VetoReason.ERROR_FRAME, id="error-object"
        ),
        pytest.param(b"not json", VetoReason.NO_USAGE, id="not-json"),
    ],
)
def test_json_vetoes(response: bytes, veto: VetoReason) -> None:
    session = open_chat()
    session.receive(s.ResponseHeaders(200, "application/json"))
    session.receive(s.ResponseBody(response, True))
    session.resolve(ACTIVE)
    assert verdict_of(session).veto is veto
    assert session.pending_commit is None


@pytest.mark.parametrize(
    ("status", "content_type"),
    [
        pytest.param(500, "application/json", id="server-error"),
        pytest.param(429, "application/json", id="rate-limited"),
        pytest.param(200, "text/plain", id="not-json"),
        pytest.param(200, "", id="no-content-type"),
    ],
)
def test_unwatched_responses(status: int, content_type: str) -> None:
    session = open_chat()
    assert session.receive(s.ResponseHeaders(status, content_type)) is s.CONTINUE
    assert session.receive(s.ResponseBody(b"anything", True)) is s.CONTINUE
    assert session.pending_commit is None


def test_non_2xx_is_vetoed_at_once() -> None:
    session = open_chat()
    session.receive(s.ResponseHeaders(503, "application/json"))
    assert verdict_of(session).veto is VetoReason.NON_2XX


def test_bodiless_response_ends_the_session() -> None:
    session = open_chat()
    assert session.receive(s.ResponseHeaders(200, "application/json", True)) is s.CONTINUE
    assert verdict_of(session).veto is VetoReason.NO_USAGE
    with pytest.raises(SessionStateError):
        session.receive(s.ResponseBody(b"", True))


def test_local_reply_before_the_request_body() -> None:
    session = new_session()
    session.receive(s.RequestHeaders(CHAT, "POST", AUTH))
    assert session.receive(s.ResponseHeaders(413, "text/plain")) is s.CONTINUE


# ---- SSE responses ----


def stream_session() -> Driven:
    session = open_chat(MARKED)
    step = session.receive(s.ResponseHeaders(200, "text/event-stream"))
    assert step == s.WatchResponse(s.ResponseMode.STREAMED)
    return session


def feed(session: Driven, chunks: Sequence[bytes], classification: Classification) -> bytes:
    """Feed ``chunks`` (the last with eos); return what would reach the client."""
    out = b""
    for i, chunk in enumerate(chunks):
        step = session.receive(s.ResponseBody(chunk, i == len(chunks) - 1))
        if step is s.NEED_CLASSIFICATION:
            step = session.resolve(classification)
        out += chunk if step is s.CONTINUE else _emitted(step)
    return out


def _emitted(step: s.Step) -> bytes:
    assert isinstance(step, s.EmitChunk), step
    return step.data


def test_sse_events_before_usage_never_wait_for_classification() -> None:
    session = stream_session()
    first = sse(CHUNK)
    assert session.receive(s.ResponseBody(first)) is s.CONTINUE
    assert session.receive(s.ResponseBody(sse(CHUNK))) is s.CONTINUE
    assert session.receive(s.ResponseBody(sse(USAGE_FRAME))) is s.NEED_CLASSIFICATION
    edited = _emitted(session.resolve(ACTIVE))
    usage = codec.loads(edited.removeprefix(b"data: ").strip())["usage"]
    assert usage["cache_creation"]["ephemeral_5m_input_tokens"] == 12
    assert session.verdict is None  # not before end of stream
    assert session.receive(s.ResponseBody(sse(b"[DONE]"))) is s.CONTINUE
    assert session.receive(s.ResponseBody(b"", True)) is s.CONTINUE
    assert verdict_of(session).commit
    assert session.pending_commit == PENDING


def test_sse_partial_event_is_held_back_until_complete() -> None:
    session = stream_session()
    whole = sse(CHUNK)
    assert _emitted(session.receive(s.ResponseBody(whole[:7]))) == b""
    assert _emitted(session.receive(s.ResponseBody(whole[7:] + whole[:3]))) == whole
    assert _emitted(session.receive(s.ResponseBody(whole[3:], True))) == whole


def test_sse_inactive_stream_is_byte_identical() -> None:
    session = stream_session()
    assert feed(session, [STREAM[:40], STREAM[40:90], STREAM[90:], b""], INACTIVE) == STREAM
    assert session.pending_commit is None


def test_sse_every_split_point_gives_the_same_output() -> None:
    expected = feed(stream_session(), [STREAM, b""], ACTIVE)
    assert expected != STREAM
    for cut in range(1, len(STREAM)):
        session = stream_session()
        assert feed(session, [STREAM[:cut], STREAM[cut:], b""], ACTIVE) == expected
        assert session.pending_commit == PENDING


def test_sse_tokens_sharing_a_chunk_with_the_usage_frame_do_not_wait() -> None:
    session = stream_session()
    assert _emitted(session.receive(s.ResponseBody(sse(CHUNK, USAGE_FRAME)))) == sse(CHUNK)
    assert session.receive(s.ResponseBody(sse(b"[DONE]"))) is s.NEED_CLASSIFICATION
    held = _emitted(session.resolve(ACTIVE))
    assert held.endswith(sse(b"[DONE]"))
    assert b"cache_creation" in held


def test_sse_usage_frame_alone_in_the_last_chunk_is_joined_there() -> None:
    session = stream_session()
    assert session.receive(s.ResponseBody(sse(CHUNK, USAGE_FRAME), True)) is s.NEED_CLASSIFICATION
    assert b"cache_creation" in _emitted(session.resolve(ACTIVE))
    assert verdict_of(session).commit


def test_sse_offered_classification_is_used_without_asking() -> None:
    session = stream_session()
    assert session.wants_classification
    session.offer(ACTIVE)
    assert not wants(session)
    first = _emitted(session.receive(s.ResponseBody(sse(CHUNK, USAGE_FRAME))))
    assert b"cache_creation" in first
    assert session.receive(s.ResponseBody(b"", True)) is s.CONTINUE
    with pytest.raises(SessionStateError):
        session.offer(ACTIVE)


def test_json_offered_classification_is_used_without_asking() -> None:
    session = open_chat()
    session.receive(s.ResponseHeaders(200, "application/json"))
    session.offer(ACTIVE)
    assert isinstance(session.receive(s.ResponseBody(json_response(), True)), s.ReplaceBody)


def test_known_inactive_classification_leaves_the_response_unwatched() -> None:
    session = new_session(scrub=False)
    session.receive(s.RequestHeaders(CHAT, "POST", AUTH))
    session.receive(s.RequestBody(MARKED))
    session.offer(INACTIVE)
    assert session.receive(s.ResponseHeaders(200, "application/json")) is s.CONTINUE
    assert not session.is_awaiting_response
    assert session.receive(s.ResponseBody(json_response(), True)) is s.CONTINUE
    assert session.verdict is None
    assert session.pending_commit is None


@pytest.mark.parametrize(
    ("content_type", "mode"),
    [
        pytest.param("application/json", s.ResponseMode.BUFFERED, id="json"),
        pytest.param("text/event-stream", s.ResponseMode.STREAMED, id="sse"),
    ],
)
def test_known_active_classification_still_watches_the_response(
    content_type: str, mode: s.ResponseMode
) -> None:
    session = open_chat()
    session.offer(Classification.zero("no_markers", "m"))
    assert session.receive(s.ResponseHeaders(200, content_type)) == s.WatchResponse(mode)
    assert session.is_awaiting_response


def test_offer_needs_a_job() -> None:
    session = open_chat(headers={})
    assert not session.wants_classification
    with pytest.raises(SessionStateError):
        session.offer(ACTIVE)


def test_sse_without_end_of_stream_has_no_verdict() -> None:
    session = stream_session()
    assert session.receive(s.ResponseBody(sse(USAGE_FRAME))) is s.NEED_CLASSIFICATION
    session.resolve(ACTIVE)
    assert session.verdict is None
    assert session.pending_commit is None


@pytest.mark.parametrize(
    ("stream", "veto"),
    [
        pytest.param(
            sse(CHUNK, codec.dumps({"error": {"message": "boom"}})),
            VetoReason.ERROR_FRAME,
            id="error-frame",
        ),
        pytest.param(sse(CHUNK, b"[DONE]"), VetoReason.NO_USAGE, id="no-usage-frame"),
    ],
)
def test_sse_vetoes(stream: bytes, veto: VetoReason) -> None:
    session = stream_session()
    assert feed(session, [stream, b""], ACTIVE) == stream
    assert verdict_of(session).veto is veto


def test_sse_trailers_end_the_stream() -> None:
    session = stream_session()
    feed_step = session.receive(s.ResponseBody(sse(USAGE_FRAME)))
    assert feed_step is s.NEED_CLASSIFICATION
    session.resolve(ACTIVE)
    assert session.receive(s.ResponseTrailers()) is s.CONTINUE
    assert verdict_of(session).commit


def test_sse_oversized_event_passes_through_and_vetoes() -> None:
    session = stream_session()
    big = b"data: " + b"x" * (70 * 1024)
    assert feed(session, [big, b"\n\n", b""], ACTIVE) == big + b"\n\n"
    assert verdict_of(session).veto is VetoReason.OVERSIZED_EVENT


# ---- illegal sequences ----


def _request_body_first() -> Driven:
    session = new_session()
    session.receive(s.RequestBody(b"{}"))
    return session


def _headers_twice() -> Driven:
    session = open_chat()
    session.receive(s.RequestHeaders(CHAT, "POST", AUTH))
    return session


def _response_body_before_headers() -> Driven:
    session = open_chat()
    session.receive(s.ResponseBody(b"{}", True))
    return session


def _receive_while_awaiting() -> Driven:
    session = open_chat()
    session.receive(s.ResponseHeaders(200, "application/json"))
    session.receive(s.ResponseBody(json_response(), True))
    session.receive(s.ResponseBody(b"", True))
    return session


def _resolve_unasked() -> Driven:
    session = open_chat()
    session.resolve(ACTIVE)
    return session


def _after_json_end() -> Driven:
    session = open_chat()
    session.receive(s.ResponseHeaders(200, "application/json"))
    session.receive(s.ResponseBody(json_response(), True))
    session.resolve(ACTIVE)
    session.receive(s.ResponseBody(b"more", True))
    return session


def _trailers_on_json() -> Driven:
    session = open_chat()
    session.receive(s.ResponseHeaders(200, "application/json"))
    session.receive(s.ResponseTrailers())
    return session


@pytest.mark.parametrize(
    "sequence",
    [
        pytest.param(_request_body_first, id="body-before-headers"),
        pytest.param(_headers_twice, id="request-headers-twice"),
        pytest.param(_response_body_before_headers, id="response-body-before-headers"),
        pytest.param(_receive_while_awaiting, id="receive-while-awaiting"),
        pytest.param(_resolve_unasked, id="resolve-unasked"),
        pytest.param(_after_json_end, id="after-end"),
        pytest.param(_trailers_on_json, id="trailers-on-buffered-json"),
    ],
)
def test_illegal_sequences_raise(sequence: Any) -> None:
    with pytest.raises(SessionStateError):
        sequence()


# ---- property: every legal Envoy sequence is accepted ----

REQUEST_BODIES = st.sampled_from(
    [MARKED, body(), body(stream=True), b"{bad", codec.dumps([1])]
)  # fmt: skip
STATUSES = st.sampled_from([200, 201, 400, 413, 500])
CONTENT_TYPES = st.sampled_from(["application/json", "text/event-stream", "text/plain", ""])


def _split(data: st.DataObject, raw: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=6)))
    edges = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(edges) if a < b]


def _answer(session: Driven, event: s.Event, classification: Classification) -> s.Action:
    step = session.receive(event)
    if step is s.NEED_CLASSIFICATION:
        return session.resolve(classification)
    assert isinstance(step, s.Action)
    return step


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_legal_sequence_is_accepted(data: st.DataObject) -> None:
    session = new_session()
    classification = data.draw(st.sampled_from([ACTIVE, INACTIVE]))
    chat = data.draw(st.booleans())
    step = _answer(session, s.RequestHeaders(CHAT if chat else "/v1/models", "POST", AUTH), ACTIVE)
    if step is s.SKIP_REST:
        return
    step = _answer(session, s.RequestBody(data.draw(REQUEST_BODIES)), classification)
    if isinstance(step, s.Reject):
        return
    headers = s.ResponseHeaders(
        data.draw(STATUSES), data.draw(CONTENT_TYPES), data.draw(st.booleans())
    )
    step = _answer(session, headers, classification)
    if not isinstance(step, s.WatchResponse):
        assert session.pending_commit is None
        return
    raw = STREAM if step.mode is s.ResponseMode.STREAMED else json_response()
    chunks = _split(data, raw) if step.mode is s.ResponseMode.STREAMED else [raw]
    complete = data.draw(st.booleans())
    out = b""
    for i, chunk in enumerate(chunks):
        eos = complete and i == len(chunks) - 1
        reply = _answer(session, s.ResponseBody(chunk, eos), classification)
        out += chunk if reply is s.CONTINUE else getattr(reply, "data", getattr(reply, "body", b""))
    if not complete:
        assert session.verdict is None
        assert session.pending_commit is None
        return
    assert session.verdict is not None
    assert (session.pending_commit is not None) == (classification is ACTIVE and session.has_job)
    if classification is INACTIVE:
        assert out == raw


ANY_EVENT = st.one_of(
    st.builds(
        s.RequestHeaders,
        st.sampled_from([CHAT, "/v1/models"]),
        st.sampled_from(["POST", "GET"]),
        st.just(AUTH),
        st.booleans(),
    ),
    st.builds(s.RequestBody, st.sampled_from([MARKED, body(), b"{x"]), st.booleans()),
    st.just(s.RequestTrailers()),
    st.builds(s.ResponseHeaders, STATUSES, CONTENT_TYPES, st.booleans()),
    st.builds(s.ResponseBody, st.sampled_from([STREAM, json_response(), b""]), st.booleans()),
    st.just(s.ResponseTrailers()),
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(ANY_EVENT, max_size=8))
def test_any_sequence_is_accepted_or_rejected_cleanly(events: list[s.Event]) -> None:
    session = new_session()
    for event in events:
        try:
            _answer(session, event, ACTIVE)
        except SessionStateError:
            return


# ---- continuous usage stats: usage on every chunk ----


def _usage_chunk(choices: list[Any], **usage: Any) -> bytes:
    return codec.dumps({"choices": choices, "usage": {**USAGE, **usage}})


ROLE_CHUNK = _usage_chunk([{"delta": {"role": "assistant"}}], prompt_cache_hit_tokens=9)
TOKEN_CHUNK = _usage_chunk([{"delta": {"content": "hi"}, "finish_reason": None}])
FINISH_CHUNK = _usage_chunk([{"delta": {}, "finish_reason": "stop"}])
LAST_CHUNK = _usage_chunk([], prompt_tokens_details={"cached_tokens": 7})


def _frames_usage(data: bytes) -> list[dict[str, Any]]:
    found = []
    for frame in data.split(b"\n\n"):
        if frame.startswith(b"data: {"):
            found.append(codec.loads(frame[6:])["usage"])
    return found


def test_continuous_usage_frames_never_wait_and_the_first_final_one_joins() -> None:
    session = open_chat()
    session.receive(s.ResponseHeaders(200, "text/event-stream"))
    early = session.receive(s.ResponseBody(sse(ROLE_CHUNK, TOKEN_CHUNK)))
    assert isinstance(early, s.EmitChunk)  # the role chunk lost its provider field
    assert [u.get("cache_read_input_tokens") for u in _frames_usage(early.data)] == [None, None]
    assert "prompt_cache_hit_tokens" not in _frames_usage(early.data)[0]
    assert session.receive(s.ResponseBody(sse(FINISH_CHUNK))) is s.NEED_CLASSIFICATION
    joined = session.resolve(ACTIVE)
    assert isinstance(joined, s.EmitChunk)
    assert _frames_usage(joined.data)[0]["cache_creation_input_tokens"] == 12
    last = session.receive(s.ResponseBody(sse(LAST_CHUNK, b"[DONE]"), True))
    assert isinstance(last, s.EmitChunk)
    final = _frames_usage(last.data)[0]
    assert final["cache_creation_input_tokens"] == 12
    assert final["prompt_tokens_details"] == {"cached_tokens": 0}
    assert session.pending_commit == PENDING


def test_usage_frames_after_an_early_classification_get_the_split_at_once() -> None:
    session = open_chat()
    session.offer(ACTIVE)
    session.receive(s.ResponseHeaders(200, "text/event-stream"))
    step = session.receive(s.ResponseBody(sse(ROLE_CHUNK, TOKEN_CHUNK, FINISH_CHUNK)))
    assert isinstance(step, s.EmitChunk)
    assert [u["cache_creation_input_tokens"] for u in _frames_usage(step.data)] == [12, 12, 12]


# ---- layouts without request headers, or without response headers ----


def _attributes(path: str = CHAT, **headers: str) -> dict[str, str]:
    found = {"request.path": path, "request.method": "POST", "request.id": "req-7"}
    found |= {f"request.headers['{name}']": value for name, value in headers.items()}
    return found


BODY_FIRST = _attributes(authorization="Bearer sk-test", **{"x-tenant": "t1"})


def test_body_first_takes_the_request_from_its_attributes() -> None:
    session = new_session(caller_headers=frozenset({"x-tenant"}))
    step = session.receive(s.RequestBody(MARKED, attributes=BODY_FIRST))
    assert isinstance(step, s.ReplaceBody)
    job = session.take_job()
    assert job is not None
    assert (job.caller.bearer, dict(job.caller.headers)) == ("sk-test", {"x-tenant": "t1"})
    assert session.session.request_id == "req-7"


def test_body_first_without_a_bearer_is_inactive() -> None:
    session = new_session()
    attributes = {k: v for k, v in BODY_FIRST.items() if "authorization" not in k}
    session.receive(s.RequestBody(MARKED, attributes=attributes))
    assert session.take_job() is None
    assert [type(e) for e in session.effects] == [s.RequestRead, s.Classified]


def test_body_first_for_another_route_passes_everything() -> None:
    session = new_session()
    assert (
        session.receive(s.RequestBody(MARKED, attributes=_attributes("/v1/models"))) is s.CONTINUE
    )
    assert session.receive(s.ResponseHeaders(200, "application/json")) is s.CONTINUE
    assert session.effects == []


def test_body_first_cannot_remove_the_breakpoint_parameter() -> None:
    session = new_session()
    path = CHAT + "?cacheBreakpoint=lastUserMessage"
    step = session.receive(
        s.RequestBody(MARKED, attributes=_attributes(path, authorization="Bearer k"))
    )
    assert isinstance(step, s.Reject)
    assert codec.loads(step.body)["error"]["code"] == "invalid_cache_breakpoint"


def test_streamed_json_is_held_until_whole_then_edited() -> None:
    session = open_chat()
    first, rest = json_response()[:10], json_response()[10:]
    assert session.receive(s.ResponseBody(first, status=200)) == s.EmitChunk(b"")
    assert session.receive(s.ResponseBody(rest, True)) is s.NEED_CLASSIFICATION
    step = session.resolve(ACTIVE)
    assert isinstance(step, s.EmitChunk)
    assert codec.loads(step.data)["usage"]["cache_creation_input_tokens"] == 12
    assert session.pending_commit == PENDING


def test_streamed_sse_without_response_headers_is_edited_frame_by_frame() -> None:
    session = open_chat(body(stream=True))
    session.offer(ACTIVE)
    out = b""
    for i, chunk in enumerate([sse(CHUNK), sse(USAGE_FRAME), sse(b"[DONE]")]):
        status = 200 if i == 0 else None
        step = session.receive(s.ResponseBody(chunk, i == 2, status))
        out += chunk if step is s.CONTINUE else _emitted(step)
    usage = codec.loads(out.split(b"\n\n")[1].removeprefix(b"data: "))["usage"]
    assert usage["cache_creation_input_tokens"] == 12
    assert session.pending_commit == PENDING


def test_streamed_error_answer_without_response_headers_is_vetoed() -> None:
    session = open_chat()
    assert session.receive(s.ResponseBody(b'{"error": {}}', True, 503)) is s.CONTINUE
    assert verdict_of(session).veto is VetoReason.NON_2XX


# ---- what the accounting record is built from ----


@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_settled_carries_the_classification_and_the_upstreams_usage(streamed: bool) -> None:
    session = open_chat()
    content_type = "text/event-stream" if streamed else "application/json"
    session.receive(s.ResponseHeaders(200, content_type))
    answer = STREAM if streamed else json_response()
    assert session.receive(s.ResponseBody(answer, True)) is s.NEED_CLASSIFICATION
    session.resolve(ACTIVE)
    (settled,) = session._of(s.Settled)

    assert settled.classification == ACTIVE
    assert settled.usage == USAGE
    assert settled.pending == PENDING


@pytest.mark.parametrize(
    ("known", "content_type"),
    [
        pytest.param(None, "text/plain", id="not-json-nor-sse"),
        pytest.param(ACTIVE, "application/octet-stream", id="known-active"),
    ],
)
def test_an_unwatched_2xx_answer_is_reported(
    known: Classification | None, content_type: str
) -> None:
    session = open_chat()
    if known is not None:
        session.offer(known)
    assert session.receive(s.ResponseHeaders(200, content_type)) is s.CONTINUE

    assert session._of(s.Unwatched) == [s.Unwatched(known)]
    assert session._of(s.Settled) == []


def test_a_non_chat_answer_is_not_reported() -> None:
    session = new_session()
    session.receive(s.RequestHeaders("/v1/models", "GET", {}))
    session.receive(s.ResponseHeaders(200, "application/json"))

    assert session.effects == []


def test_a_streams_usage_sent_before_its_end_is_reported_once() -> None:
    session = open_chat()
    session.offer(ACTIVE)
    session.receive(s.ResponseHeaders(200, "text/event-stream"))
    session.receive(s.ResponseBody(sse(CHUNK, USAGE_FRAME)))
    session.receive(s.ResponseBody(sse(USAGE_FRAME)))
    session.receive(s.ResponseBody(sse(b"[DONE]"), True))

    assert session._of(s.UsageSent) == [s.UsageSent(ACTIVE, USAGE)]
    assert len(session._of(s.Settled)) == 1
