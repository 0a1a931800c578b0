"""The session on the Messages and Responses routes: the dialect is the route's, the rest shared."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extproc.core import codec
from extproc.core import phases as s
from extproc.core.model import (
    CacheEntry,
    Classification,
    Outcome,
    PendingWrite,
    PrefixHash,
    PrincipalId,
    Scope,
    Split,
    Tier,
)
from extproc.core.session import Session, SessionPolicy
from extproc.core.verdict import VetoReason

TRANSCRIPTS = Path(__file__).parent / "transcripts"
AUTH = {"authorization": "Bearer sk-test"}
SCOPE = Scope(PrincipalId("p"), "m", "v1")
PENDING = PendingWrite(SCOPE, (CacheEntry(PrefixHash(b"\x01" * 32), 1900, Tier.M5),), None)
ACTIVE = Classification(
    Outcome.READ_AND_CREATE,
    Split(1500, {Tier.M5: 300, Tier.H1: 100}),
    PENDING,
    model="m",
)
MARKED_MESSAGES = {
    "model": "m",
    "max_tokens": 64,
    "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "hi"}],
}
MARKED_RESPONSES = {
    "model": "m",
    "instructions": "sys",
    "input": [{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}],
}


class Run:
    """One request through a session, effects collected."""

    def __init__(self, path: str, doc: dict[str, Any], headers_first: bool = True) -> None:
        self.session = Session(SessionPolicy())
        self.effects: list[s.Effect] = []
        self.path = path
        raw = codec.dumps(doc)
        if headers_first:
            self.first = self.receive(s.RequestHeaders(path, "POST", AUTH))
            self.request = self.receive(s.RequestBody(raw))
        else:
            attributes = {
                "request.path": path,
                "request.method": "POST",
                "request.headers['authorization']": AUTH["authorization"],
            }
            self.request = self.receive(s.RequestBody(raw, attributes=attributes))

    def receive(self, event: s.Event) -> s.Step:
        turn = self.session.receive(event)
        self.effects += turn.effects
        return turn.step

    def resolve(self, classification: Classification) -> s.Step:
        turn = self.session.resolve(classification)
        self.effects += turn.effects
        return turn.step

    @property
    def settled(self) -> s.Settled:
        (found,) = [e for e in self.effects if isinstance(e, s.Settled)]
        return found

    @property
    def forwarded(self) -> dict[str, Any]:
        assert isinstance(self.request, s.ReplaceBody)
        parsed: dict[str, Any] = codec.loads(self.request.body)
        return parsed


@pytest.mark.parametrize("headers_first", [True, False], ids=["headers-first", "body-first"])
@pytest.mark.parametrize(
    ("path", "doc", "marker_free"),
    [
        pytest.param(
            "/v1/messages",
            MARKED_MESSAGES,
            {**MARKED_MESSAGES, "system": [{"type": "text", "text": "sys"}]},
            id="messages",
        ),
        pytest.param(
            "/anthropic/v1/responses?x=1",
            MARKED_RESPONSES,
            {**MARKED_RESPONSES, "input": [{"role": "user", "content": "hi"}]},
            id="responses",
        ),
    ],
)
def test_the_route_picks_the_dialect(
    path: str, doc: dict[str, Any], marker_free: dict[str, Any], headers_first: bool
) -> None:
    run = Run(path, doc, headers_first)
    assert run.forwarded == marker_free
    (start,) = [e for e in run.effects if isinstance(e, s.StartClassify)]
    assert start.job.prepared.route in path
    assert len(start.job.prepared.breakpoints) == 1


@pytest.mark.parametrize(
    "path",
    ["/v1/messages/count_tokens", "/v1/responses/resp_1/cancel", "/v1/threads/t/messages"],
)
def test_neighbouring_paths_are_not_ours(path: str) -> None:
    session = Session(SessionPolicy())
    assert session.receive(s.RequestHeaders(path, "POST", AUTH)).step is s.SKIP_REST


def test_bad_markers_on_messages_get_anthropics_envelope() -> None:
    doc = {**MARKED_MESSAGES, "system": [{"type": "text", "text": "s", "cache_control": 1}]}
    run = Run("/v1/messages", doc)
    assert isinstance(run.request, s.Reject)
    assert codec.loads(run.request.body)["type"] == "error"
    assert run.request.details == "extproc_invalid_cache_control"


def test_the_breakpoint_parameter_is_not_read_on_messages() -> None:
    run = Run("/v1/messages?cacheBreakpoint=bogus", MARKED_MESSAGES)
    assert run.first is s.CONTINUE
    assert isinstance(run.request, s.ReplaceBody)


def _stream(run: Run, name: str) -> bytes:
    """What the client receives of the transcript ``name``, cut into 97-byte chunks."""
    data = (TRANSCRIPTS / name).read_bytes()
    assert isinstance(run.receive(s.ResponseHeaders(200, "text/event-stream")), s.WatchResponse)
    out = b""
    for i in range(0, len(data), 97):
        chunk = data[i : i + 97]
        step = run.receive(s.ResponseBody(chunk, i + 97 >= len(data)))
        if step is s.NEED_CLASSIFICATION:
            step = run.resolve(ACTIVE)
        out += step.data if isinstance(step, s.EmitChunk) else chunk
    return out


def test_a_messages_stream_commits_after_message_stop() -> None:
    run = Run("/v1/messages", MARKED_MESSAGES)
    out = _stream(run, "messages/vllm_0_23.sse")
    original = (TRANSCRIPTS / "messages/vllm_0_23.sse").read_bytes()
    edited = (TRANSCRIPTS / "messages/vllm_0_23.edited.sse").read_bytes()
    # message_start went out before the classification was known: as received (nothing to
    # scrub); message_delta waited for it and carries the split
    delta = original.index(b"event: message_delta")
    assert out[:delta] == original[:delta]
    assert out[delta:] == edited[edited.index(b"event: message_delta") :]
    assert run.settled.verdict.commit
    assert run.settled.pending == PENDING


@pytest.mark.parametrize(
    ("name", "veto"),
    [
        pytest.param("messages/vllm_error.sse", VetoReason.ERROR_FRAME, id="messages-error"),
        pytest.param("messages/sglang_error.sse", VetoReason.ERROR_FRAME, id="sglang-error"),
        pytest.param("responses/aborted.sse", VetoReason.NO_FINAL_EVENT, id="responses-aborted"),
        pytest.param("responses/failed.sse", VetoReason.ERROR_FRAME, id="responses-failed"),
    ],
)
def test_a_stream_that_fails_commits_nothing(name: str, veto: VetoReason) -> None:
    path = "/v1/messages" if name.startswith("messages") else "/v1/responses"
    run = Run(path, MARKED_MESSAGES if path == "/v1/messages" else MARKED_RESPONSES)
    _stream(run, name)
    assert run.settled.verdict.veto is veto
    assert run.settled.pending is None


def test_a_messages_stream_without_message_stop_commits_nothing() -> None:
    data = (TRANSCRIPTS / "messages/vllm_0_23.sse").read_bytes()
    run = Run("/v1/messages", MARKED_MESSAGES)
    run.receive(s.ResponseHeaders(200, "text/event-stream"))
    cut = data[: data.index(b"event: message_stop")]
    if run.receive(s.ResponseBody(cut, end_of_stream=True)) is s.NEED_CLASSIFICATION:
        run.resolve(ACTIVE)
    assert run.settled.verdict.veto is VetoReason.NO_FINAL_EVENT


def test_a_responses_json_answer_gets_the_split() -> None:
    run = Run("/v1/responses", MARKED_RESPONSES)
    assert isinstance(run.receive(s.ResponseHeaders(200, "application/json")), s.WatchResponse)
    usage = {"input_tokens": 2000, "input_tokens_details": {"cached_tokens": 7}, "output_tokens": 1}
    answer = codec.dumps({"object": "response", "status": "completed", "usage": usage})
    assert run.receive(s.ResponseBody(answer, end_of_stream=True)) is s.NEED_CLASSIFICATION
    step = run.resolve(ACTIVE)
    assert isinstance(step, s.ReplaceBody)
    details = codec.loads(step.body)["usage"]["input_tokens_details"]
    assert details == {"cached_tokens": 1500, "cache_write_tokens": 400}
    assert run.settled.verdict.commit


@pytest.mark.parametrize("headers_first", [True, False], ids=["headers-first", "body-first"])
@pytest.mark.parametrize(
    ("headers", "token"),
    [
        pytest.param({"x-api-key": " sk-ant-1 "}, "sk-ant-1", id="x-api-key"),
        pytest.param({"authorization": "Bearer b", "x-api-key": "k"}, "b", id="bearer-first"),
        pytest.param({"x-api-key": "  "}, None, id="blank-key"),
    ],
)
def test_the_token_is_the_bearer_else_the_api_key(
    headers: dict[str, str], token: str | None, headers_first: bool
) -> None:
    session = Session(SessionPolicy())
    raw = codec.dumps(MARKED_MESSAGES)
    if headers_first:
        session.receive(s.RequestHeaders("/v1/messages", "POST", headers))
        turn = session.receive(s.RequestBody(raw))
    else:
        attributes = {"request.path": "/v1/messages", "request.method": "POST"}
        attributes |= {f"request.headers['{k}']": v for k, v in headers.items()}
        turn = session.receive(s.RequestBody(raw, attributes=attributes))
    starts = [e for e in turn.effects if isinstance(e, s.StartClassify)]
    assert [start.job.caller.bearer for start in starts] == ([token] if token else [])


def test_a_messages_stream_with_response_headers_skipped() -> None:
    """The streamed layout: the first body chunk carries the status; the dialect is the same."""
    run = Run("/v1/messages", {**MARKED_MESSAGES, "stream": True}, headers_first=False)
    data = (TRANSCRIPTS / "messages/sglang.sse").read_bytes()
    out = b""
    for i in range(0, len(data), 64):
        chunk, last = data[i : i + 64], i + 64 >= len(data)
        step = run.receive(s.ResponseBody(chunk, last, status=200 if i == 0 else None))
        if step is s.NEED_CLASSIFICATION:
            step = run.resolve(ACTIVE)
        out += step.data if isinstance(step, s.EmitChunk) else chunk
    delta = [ln for ln in out.split(b"\n") if ln.startswith(b'data:{"type":"message_delta"')]
    (line,) = delta
    usage = codec.loads(line[5:])["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == 2000 - 400
    assert run.settled.verdict.commit
