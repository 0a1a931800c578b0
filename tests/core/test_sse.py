"""Tests for the incremental SSE framer and the usage-frame edit."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.core import codec
from extproc.core.errors import UpstreamFormatError
from extproc.core.model import Split, Tier
from extproc.core.sse import MAX_EVENT_BYTES, EventTooLarge, Kind, SseEvent, SseStream

TRANSCRIPTS = Path(__file__).parent / "transcripts"
GOLDEN_SPLIT = Split(read=1500, creation={Tier.M5: 300, Tier.H1: 100})
K = Kind


def replay(pieces: Iterable[bytes], stream: SseStream | None = None) -> list[SseEvent]:
    stream = stream or SseStream()
    events = [event for piece in pieces for event in stream.feed(piece)]
    return events + stream.flush()


def render(stream: SseStream, events: Sequence[SseEvent], split: Split) -> bytes:
    edited = (stream.edit_usage_event(e, split) if e.kind is K.USAGE else e.raw for e in events)
    return b"".join(edited)


def cut(data: bytes, *at: int) -> list[bytes]:
    bounds = [0, *at, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# name, kinds in order, (usage_seen, error_seen, done_seen)
GOLDEN = [
    pytest.param("vllm", [*[K.PLAIN] * 4, K.USAGE, K.DONE], (True, False, True), id="vllm"),
    pytest.param("sglang", [*[K.PLAIN] * 4, K.USAGE, K.DONE], (True, False, True), id="sglang"),
    pytest.param(
        "crlf_fields", [*[K.PLAIN] * 5, K.USAGE, K.DONE], (True, False, True), id="crlf-fields"
    ),
    pytest.param("nospace", [K.PLAIN, K.PLAIN, K.USAGE, K.DONE], (True, False, True), id="nospace"),
    pytest.param(
        "error_midstream", [K.PLAIN, K.ERROR, K.DONE], (False, True, True), id="error-midstream"
    ),
    pytest.param(
        "multiline_mixed", [K.PLAIN, K.USAGE, K.PLAIN, K.DONE], (True, False, True), id="multiline"
    ),
]


@pytest.mark.parametrize(("name", "kinds", "facts"), GOLDEN)
def test_golden_transcript_whole_and_byte_by_byte(
    name: str, kinds: list[Kind], facts: tuple[bool, bool, bool]
) -> None:
    data = (TRANSCRIPTS / f"{name}.sse").read_bytes()
    golden = (TRANSCRIPTS / f"{name}.edited.sse").read_bytes()
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        stream = SseStream()
        events = replay(pieces, stream)
        assert [e.kind for e in events] == kinds
        assert b"".join(e.raw for e in events) == data
        f = stream.facts
        assert (f.usage_seen, f.error_seen, f.done_seen) == facts
        assert render(stream, events, GOLDEN_SPLIT) == golden


@pytest.mark.parametrize(("name", "kinds", "facts"), GOLDEN)
def test_golden_transcript_split_at_every_boundary(
    name: str, kinds: list[Kind], facts: tuple[bool, bool, bool]
) -> None:
    data = (TRANSCRIPTS / f"{name}.sse").read_bytes()
    whole = replay([data])
    for at in range(len(data) + 1):
        assert replay(cut(data, at)) == whole, f"split at {at}"


def test_golden_edit_touches_only_the_usage_frame() -> None:
    for path in sorted(TRANSCRIPTS.glob("*.edited.sse")):
        source = path.with_name(path.name.replace(".edited", ""))
        events = replay([source.read_bytes()])
        edited = path.read_bytes()
        for event in events:
            if event.kind is not K.USAGE:
                assert event.raw in edited
        usage = [e for e in events if e.kind is K.USAGE]
        assert len(usage) <= 1


FRAMING = [
    pytest.param([b"data: a\n\n"], [b"data: a\n\n"], id="lf"),
    pytest.param([b"data: a\r\n\r\n"], [b"data: a\r\n\r\n"], id="crlf"),
    pytest.param([b"data: a\r\r"], [b"data: a\r\r"], id="cr-only-at-flush"),
    pytest.param([b"data: a\r\rdata: b\n\n"], [b"data: a\r\r", b"data: b\n\n"], id="cr-then-lf"),
    pytest.param([b"data: a\r\r\n: c\n\n"], [b"data: a\r\r\n", b": c\n\n"], id="cr-crlf"),
    pytest.param([b"a\r\n\nb\n\r\n"], [b"a\r\n\n", b"b\n\r\n"], id="mixed-pairs"),
    pytest.param([b"a\n", b"\n"], [b"a\n\n"], id="split-in-blank-line"),
    pytest.param([b"a\r\n\r", b"\nb\n\n"], [b"a\r\n\r\n", b"b\n\n"], id="split-inside-crlf"),
    pytest.param([b"a\n\n\n\r\n"], [b"a\n\n", b"\n", b"\r\n"], id="extra-blank-lines"),
    pytest.param([b"\r", b"\n"], [b"\r\n"], id="lone-blank-crlf-split"),
    pytest.param([b"data: a\n\ndata: b"], [b"data: a\n\n", b"data: b"], id="unterminated-tail"),
    pytest.param([b"data: a\n"], [b"data: a\n"], id="one-newline-tail"),
    pytest.param([b"", b"", b"x\n\n"], [b"x\n\n"], id="empty-chunks"),
    pytest.param([], [], id="nothing"),
    pytest.param(
        [b'data: {"usage"', b":{}}\n", b"\n"], [b'data: {"usage":{}}\n\n'], id="usage-straddles"
    ),
]


@pytest.mark.parametrize(("pieces", "expected"), FRAMING)
def test_framing(pieces: list[bytes], expected: list[bytes]) -> None:
    assert [e.raw for e in replay(pieces)] == expected


def test_feed_holds_back_until_the_blank_line_completes() -> None:
    stream = SseStream()
    assert stream.feed(b"data: a\n") == []
    assert stream.feed(b"\ndata: b\r") == [SseEvent(b"data: a\n\n")]
    assert stream.feed(b"\r") == []  # "\r\r" could still become "\r\r\n"
    assert stream.feed(b"x") == [SseEvent(b"data: b\r\r")]
    assert stream.flush() == [SseEvent(b"x")]
    assert stream.flush() == []


def test_an_event_arriving_whole_is_passed_on_without_a_copy() -> None:
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    [event] = SseStream().feed(chunk)
    assert event.raw is chunk


CLASSIFY = [
    pytest.param(b'data: {"usage":{"prompt_tokens":1}}\n\n', K.USAGE, id="usage"),
    pytest.param(b'data:{"choices":[],"usage":{}}\n\n', K.USAGE, id="usage-nospace"),
    pytest.param(b'data: {"x":1,\ndata: "usage":{}}\n\n', K.USAGE, id="usage-multiline"),
    pytest.param(b'event: m\r\nid: 9\r\ndata: {"usage":{}}\r\n\r\n', K.USAGE, id="usage-fields"),
    pytest.param(b'data: {"usage":null}\n\n', K.PLAIN, id="usage-null"),
    pytest.param(b'data: {"usage": null}\n\n', K.PLAIN, id="usage-null-spaced"),
    pytest.param(b'data: {"usage":[1]}\n\n', K.PLAIN, id="usage-array"),
    pytest.param(b'data: {"content":"usage"}\n\n', K.PLAIN, id="usage-as-value"),
    pytest.param(b'data: {"c":"\\"usage\\":{}"}\n\n', K.PLAIN, id="usage-escaped-in-text"),
    pytest.param(b'data: [{"usage":{}}]\n\n', K.PLAIN, id="json-array"),
    pytest.param(b'data: {"usage":{}\n\n', K.PLAIN, id="malformed-json"),
    pytest.param(b': {"usage":{}}\n\n', K.PLAIN, id="comment-only"),
    pytest.param(b'event: usage\nid: "usage"\n\n', K.PLAIN, id="no-data"),
    pytest.param(b'data: {"error":{"message":"boom"}}\n\n', K.ERROR, id="error-object"),
    pytest.param(b'data:{"object":"error","message":"x"}\n\n', K.ERROR, id="error-envelope"),
    pytest.param(b'data: {"error":{},"usage":{}}\n\n', K.ERROR, id="error-wins-over-usage"),
    pytest.param(b'data: {"error":"text"}\n\n', K.PLAIN, id="error-string"),
    pytest.param(b"data: [DONE]\n\n", K.DONE, id="done"),
    pytest.param(b"data:[DONE]\r\n\r\n", K.DONE, id="done-nospace-crlf"),
    pytest.param(b"data: [DONE] \n\n", K.PLAIN, id="done-trailing-space"),
    pytest.param(b'data: {"c":"[DONE]"}\n\n', K.PLAIN, id="done-in-text"),
    pytest.param(b"data\n\n", K.PLAIN, id="bare-data-field"),
]


@pytest.mark.parametrize(("raw", "kind"), CLASSIFY)
def test_classify(raw: bytes, kind: Kind) -> None:
    stream = SseStream()
    assert stream.feed(raw) == [SseEvent(raw, kind)]
    facts = stream.facts
    assert (facts.usage_seen, facts.error_seen, facts.done_seen) == (
        kind is K.USAGE,
        kind is K.ERROR,
        kind is K.DONE,
    )


def test_only_the_first_usage_frame_is_the_usage_frame() -> None:
    frame = b'data: {"usage":{"prompt_tokens":5}}\n\n'
    assert [e.kind for e in replay([frame * 3])] == [K.USAGE, K.PLAIN, K.PLAIN]


EDITS = [
    pytest.param(
        b'data: {"usage":{"prompt_tokens":9}}\n\n',
        b'data: {"usage":{"prompt_tokens":9,%s}}\n\n',
        id="lf-space",
    ),
    pytest.param(
        b'id: 4\r\ndata:{"usage":{"prompt_tokens":9}}\r\n: c\r\n\r\n',
        b'id: 4\r\ndata:{"usage":{"prompt_tokens":9,%s}}\r\n: c\r\n\r\n',
        id="crlf-nospace-fields-comment",
    ),
    pytest.param(
        b'event: x\rdata: {"usage":\rdata: {"prompt_tokens":9}}\r\r',
        b'event: x\rdata: {"usage":{"prompt_tokens":9,%s}}\r\r',
        id="cr-multiline-joined",
    ),
]
INJECTED = (
    b'"prompt_tokens_details":{"cached_tokens":4},"cache_read_input_tokens":4,'
    b'"cache_creation_input_tokens":5,"cache_creation":{"ephemeral_5m_input_tokens":0,'
    b'"ephemeral_1h_input_tokens":0,"ephemeral_24h_input_tokens":5}'
)


@pytest.mark.parametrize(("raw", "expected"), EDITS)
def test_edit_usage_event(raw: bytes, expected: bytes) -> None:
    stream = SseStream()
    [event] = stream.feed(raw) + stream.flush()
    edited = stream.edit_usage_event(event, Split(read=4, creation={Tier.H24: 5}))
    assert edited == expected % INJECTED
    again = stream.feed(edited) + stream.flush()
    assert again == [SseEvent(edited, K.PLAIN)]  # already seen: not a second usage frame


def test_edit_is_idempotent_on_an_already_edited_frame() -> None:
    split = Split(read=4, creation={Tier.H24: 5})
    first = SseStream()
    [event] = first.feed(b'data: {"usage":{"prompt_tokens":9}}\n\n')
    edited = first.edit_usage_event(event, split)
    second = SseStream()
    [same] = second.feed(edited)
    assert second.edit_usage_event(same, split) is same.raw


def test_edit_shows_the_split_as_computed() -> None:
    stream = SseStream()
    [event] = stream.feed(b'data: {"usage":{"prompt_tokens":9}}\n\n')
    edited = stream.edit_usage_event(event, Split(read=10))
    usage = codec.loads(edited.removeprefix(b"data: "))["usage"]
    assert usage["cache_read_input_tokens"] == 10
    assert usage["prompt_tokens_details"] == {"cached_tokens": 10}
    assert usage["prompt_tokens"] == 9


def test_edit_refuses_other_events() -> None:
    stream = SseStream()
    [event] = stream.feed(b"data: [DONE]\n\n")
    with pytest.raises(ValueError, match="not the usage frame"):
        stream.edit_usage_event(event, Split())


OVERSIZED = [
    pytest.param([b"data: " + b"x" * 100], id="partial-grows-past-cap"),
    pytest.param([b"data: a\n\n", b"data: " + b"x" * 100 + b"\n\n"], id="complete-in-one-chunk"),
    pytest.param([b"data: a\n\ndata: " + b"x" * 100 + b"\n\nrest"], id="after-a-good-event"),
    pytest.param([bytes([b]) for b in b": " + b"y" * 100], id="byte-by-byte"),
]


def feed_all(stream: SseStream, pieces: list[bytes], out: list[SseEvent]) -> None:
    for piece in pieces:
        out += stream.feed(piece)


@pytest.mark.parametrize("pieces", OVERSIZED)
def test_oversized_event_raises_and_passes_everything_through(pieces: list[bytes]) -> None:
    stream, out = SseStream(max_event_bytes=64), []
    fed = b"".join(pieces)
    with pytest.raises(EventTooLarge) as caught:
        feed_all(stream, pieces, out)
    assert isinstance(caught.value, UpstreamFormatError)
    sent = b"".join(e.raw for e in out) + caught.value.pending
    assert fed.startswith(sent)
    assert len(sent) > 64
    later = stream.feed(fed[len(sent) :] + b"data: [DONE]\n\n") + stream.flush()
    assert later == [SseEvent(fed[len(sent) :] + b"data: [DONE]\n\n")]  # passed through as is
    assert stream.facts.oversized
    assert not stream.facts.done_seen


def test_event_of_exactly_the_cap_is_accepted() -> None:
    event = b"data: " + b"x" * (MAX_EVENT_BYTES - 8) + b"\n\n"
    assert len(event) == MAX_EVENT_BYTES
    assert replay([event[i : i + 1000] for i in range(0, len(event), 1000)]) == [SseEvent(event)]
    with pytest.raises(EventTooLarge):
        SseStream().feed(event[:-2] + b"x\n\n")


# --- properties -----------------------------------------------------------------------------

_EOLS = [b"\n", b"\r\n", b"\r"]
_REFERENCE_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)")
_text = st.text(st.characters(exclude_characters="\r\n", codec="utf-8"), max_size=12)
_payloads = st.one_of(
    st.builds(lambda t: codec.dumps({"choices": [{"delta": {"content": t}}]}), _text),
    st.builds(lambda t: codec.dumps({"choices": [], "usage": {"prompt_tokens": 9, "x": t}}), _text),
    st.builds(lambda t: codec.dumps({"usage": None, "c": t}), _text),
    st.builds(lambda t: codec.dumps({"error": {"message": t}}), _text),
    st.just(b"[DONE]"),
)
_lines = st.one_of(
    st.builds(lambda p, sp: (b"data: " if sp else b"data:") + p, _payloads, st.booleans()),
    st.builds(lambda t: b":" + t.encode(), _text),
    st.builds(lambda t: b"event: " + t.encode(), _text),
    st.builds(lambda n: b"id: %d" % n, st.integers(0, 99)),
)
_events = st.builds(
    lambda lines, eols, end: b"".join(ln + e for ln, e in zip(lines, eols, strict=False)) + end,
    st.lists(_lines, min_size=1, max_size=3),
    st.lists(st.sampled_from(_EOLS), min_size=3, max_size=3),
    st.sampled_from(_EOLS),
)
streams = st.lists(_events, max_size=8).map(b"".join)
noise = st.lists(
    st.sampled_from([b"\r", b"\n", b"data: ", b"data:", b'{"usage":{}}', b": x", b"[DONE]"]),
    max_size=40,
).map(b"".join)


@st.composite
def chunked(draw: st.DrawFn, data: st.SearchStrategy[bytes]) -> tuple[bytes, list[bytes]]:
    whole = draw(data)
    cuts = draw(st.lists(st.integers(0, len(whole)), max_size=10))
    return whole, cut(whole, *sorted(cuts))


def reference_frames(data: bytes) -> list[bytes]:
    """The SSE spec's framing, line by line over the whole input."""
    frames, current, pos = [], b"", 0
    for line in _REFERENCE_LINE.finditer(data):
        current += line.group(0)
        pos = line.end()
        if line.group(0) in (b"\n", b"\r\n", b"\r"):
            frames.append(current)
            current = b""
    rest = current + data[pos:]
    return frames + ([rest] if rest else [])


@given(chunked(streams | noise))
def test_framing_is_chunking_invariant_and_lossless(case: tuple[bytes, list[bytes]]) -> None:
    whole, pieces = case
    expected = replay([whole])
    assert replay(pieces) == expected
    assert b"".join(e.raw for e in expected) == whole
    assert [e.raw for e in expected] == reference_frames(whole)


USAGE_FRAME = b'data: {"usage":{"prompt_tokens":9}}\n\n'


def data_line(raw: bytes) -> bytes:
    [line] = [ln for ln in re.split(rb"\r\n|\r|\n", raw) if ln.startswith(b"data:")]
    return line.removeprefix(b"data:").removeprefix(b" ")


@given(chunked(streams.map(lambda s: USAGE_FRAME + s)))
def test_usage_edit_changes_only_the_usage_frame(case: tuple[bytes, list[bytes]]) -> None:
    whole, pieces = case
    stream = SseStream()
    events = replay(pieces, stream)
    out = [stream.edit_usage_event(e, GOLDEN_SPLIT) if e.kind is K.USAGE else e.raw for e in events]
    assert [e.kind is K.USAGE for e in events] == [True] + [False] * (len(events) - 1)
    assert out[1:] == [e.raw for e in events[1:]]
    assert b"".join(out[1:]) == whole[len(USAGE_FRAME) :]
    usage = codec.loads(data_line(out[0]))["usage"]
    assert usage["cache_read_input_tokens"] == GOLDEN_SPLIT.read
    assert usage["prompt_tokens"] == 9
