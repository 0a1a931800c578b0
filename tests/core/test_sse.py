"""The incremental SSE framer, frame kinds (USAGE vs FINAL) and the usage-frame edit (§4.3).

Golden transcripts are replayed whole, byte by byte and split at every boundary; every
usage-bearing frame is edited with a ``UsageRule`` and compared with the edited golden.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.core import codec, spans
from extproc.core.dialects.chat import ANSWER as CHAT
from extproc.core.dialects.chat import is_final
from extproc.core.errors import UpstreamFormatError
from extproc.core.model import Split, Tier
from extproc.core.sse import (
    MAX_EVENT_BYTES,
    USAGE_KINDS,
    EventTooLarge,
    Kind,
    SseEvent,
    SseStream,
)
from extproc.core.usage import UsageRule, edit_usage

TRANSCRIPTS = Path(__file__).parent / "transcripts"
GOLDEN_SPLIT = Split(read=1500, creation={Tier.M5: 300, Tier.H1: 100})
GOLDEN_RULE = UsageRule(GOLDEN_SPLIT)
K = Kind


def replay(pieces: Iterable[bytes], stream: SseStream | None = None) -> list[SseEvent]:
    stream = stream or SseStream(CHAT)
    events = [event for piece in pieces for event in stream.feed(piece)]
    return events + stream.flush()


def render(stream: SseStream, events: Sequence[SseEvent], rule: UsageRule) -> bytes:
    return b"".join(
        stream.edit_usage_event(e, rule) if e.kind in USAGE_KINDS else e.raw for e in events
    )


def cut(data: bytes, *at: int) -> list[bytes]:
    bounds = [0, *at, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# ---- an independent reading of an event's data (the SSE spec, line by line) ----

_EOL = re.compile(rb"\r\n|\r|\n")


def payload(raw: bytes) -> bytes:
    values = [ln[5:] for ln in _EOL.split(raw) if ln.startswith(b"data:") or ln == b"data"]
    return b"\n".join(v[1:] if v.startswith(b" ") else v for v in values)


def other_lines(raw: bytes) -> list[bytes]:
    """The lines that are not data lines, with their line endings, in order."""
    lines = re.findall(rb"[^\r\n]*(?:\r\n|\r|\n|$)", raw)
    return [ln for ln in lines if ln and not ln.startswith(b"data")]


def assert_only_usage_changed(raw: bytes, edited: bytes) -> None:
    """``edited`` is ``raw`` with its usage value replaced, every other byte kept."""
    before, after = spans.decode(payload(raw)), spans.decode(payload(edited))
    old = spans.read(before, spans.SHALLOW).get("usage")
    new = spans.read(after, spans.SHALLOW).get("usage")
    assert old is not None
    assert new is not None
    assert after[: new.start] == before[: old.start]
    assert after[new.end :] == before[old.end :]
    assert other_lines(edited) == other_lines(raw)
    assert [e.raw for e in replay([edited])] == [edited]  # still one event


# ---- golden transcripts ----

# name, kinds in order, (usage_seen, error_seen, done_seen)
GOLDEN = [
    pytest.param("vllm", [*[K.PLAIN] * 4, K.FINAL, K.DONE], (True, False, True), id="vllm"),
    pytest.param(
        "vllm_continuous",  # vLLM 0.25, continuous_usage_stats, prompt-tokens details on
        [K.USAGE, K.USAGE, K.USAGE, K.FINAL, K.FINAL, K.DONE],
        (True, False, True),
        id="vllm-continuous-usage",
    ),
    pytest.param("sglang", [*[K.PLAIN] * 4, K.FINAL, K.DONE], (True, False, True), id="sglang"),
    pytest.param(
        "provider_cache",  # an upstream writing its own cache fields, CRLF, no space
        [K.PLAIN, K.PLAIN, K.PLAIN, K.FINAL, K.DONE],
        (True, False, True),
        id="provider-cache-fields",
    ),
    pytest.param(
        "crlf_fields", [*[K.PLAIN] * 5, K.FINAL, K.DONE], (True, False, True), id="crlf-fields"
    ),
    pytest.param("nospace", [K.PLAIN, K.PLAIN, K.FINAL, K.DONE], (True, False, True), id="nospace"),
    pytest.param(
        "error_midstream", [K.PLAIN, K.ERROR, K.DONE], (False, True, True), id="error-midstream"
    ),
    pytest.param(
        "multiline_mixed", [K.PLAIN, K.FINAL, K.PLAIN, K.DONE], (True, False, True), id="multiline"
    ),
]

# name, golden suffix, rule
RENDERS = [
    *[
        pytest.param(name, "edited", GOLDEN_RULE, id=f"{name}-edited")
        for name in (
            "vllm",
            "vllm_continuous",
            "sglang",
            "provider_cache",
            "crlf_fields",
            "nospace",
            "error_midstream",
            "multiline_mixed",
        )
    ],
    pytest.param("vllm_continuous", "scrubbed", UsageRule(), id="vllm_continuous-scrubbed"),
    pytest.param("provider_cache", "scrubbed", UsageRule(), id="provider_cache-scrubbed"),
    pytest.param("provider_cache", "", UsageRule(scrub=False), id="provider_cache-scrub-off"),
    pytest.param("vllm", "", UsageRule(), id="vllm-nothing-to-scrub"),
]


def _golden(name: str, suffix: str) -> bytes:
    return (TRANSCRIPTS / f"{name}{'.' + suffix if suffix else ''}.sse").read_bytes()


@pytest.mark.parametrize(("name", "kinds", "facts"), GOLDEN)
def test_golden_transcript_whole_and_byte_by_byte(
    name: str, kinds: list[Kind], facts: tuple[bool, bool, bool]
) -> None:
    data = _golden(name, "")
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        stream = SseStream(CHAT)
        events = replay(pieces, stream)
        assert [e.kind for e in events] == kinds
        assert b"".join(e.raw for e in events) == data
        f = stream.facts
        assert (f.usage_seen, f.error_seen, f.done_seen, f.oversized) == (*facts, False)


@pytest.mark.parametrize(("name", "kinds", "facts"), GOLDEN)
def test_golden_transcript_split_at_every_boundary(
    name: str, kinds: list[Kind], facts: tuple[bool, bool, bool]
) -> None:
    data = _golden(name, "")
    whole = replay([data])
    for at in range(len(data) + 1):
        assert replay(cut(data, at)) == whole, f"split at {at}"


@pytest.mark.parametrize(("name", "suffix", "rule"), RENDERS)
def test_golden_edit(name: str, suffix: str, rule: UsageRule) -> None:
    data = _golden(name, "")
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        stream = SseStream(CHAT)
        assert render(stream, replay(pieces, stream), rule) == _golden(name, suffix)


@pytest.mark.parametrize(("name", "suffix", "rule"), RENDERS)
def test_golden_edit_touches_only_usage_values(name: str, suffix: str, rule: UsageRule) -> None:
    stream = SseStream(CHAT)
    for event in replay([_golden(name, "")], stream):
        if event.kind in USAGE_KINDS:
            edited = stream.edit_usage_event(event, rule)
            if edited != event.raw:
                assert_only_usage_changed(event.raw, edited)


def test_golden_files_are_all_replayed() -> None:
    names = {p.name.split(".")[0] for p in TRANSCRIPTS.glob("*.sse")}
    assert names == {p.values[0] for p in GOLDEN}
    assert len(list(TRANSCRIPTS.glob("*.*.sse"))) == len([p for p in RENDERS if p.values[1]])


# ---- framing ----

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
    stream = SseStream(CHAT)
    assert stream.feed(b"data: a\n") == []
    assert stream.feed(b"\ndata: b\r") == [SseEvent(b"data: a\n\n")]
    assert stream.feed(b"\r") == []  # "\r\r" could still become "\r\r\n"
    assert stream.feed(b"x") == [SseEvent(b"data: b\r\r")]
    assert stream.flush() == [SseEvent(b"x")]
    assert stream.flush() == []


def test_an_event_arriving_whole_is_passed_on_without_a_copy() -> None:
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    [event] = SseStream(CHAT).feed(chunk)
    assert event.raw is chunk


def test_an_unterminated_rest_is_not_classified() -> None:
    events = replay([b'data: {"usage":{"prompt_tokens":1}}\n'])
    assert events == [SseEvent(b'data: {"usage":{"prompt_tokens":1}}\n', K.PLAIN)]


# ---- kinds ----

CLASSIFY = [
    pytest.param(b'data: {"usage":{"prompt_tokens":1}}\n\n', K.FINAL, id="no-choices-final"),
    pytest.param(b'data:{"choices":[],"usage":{}}\n\n', K.FINAL, id="empty-choices-final"),
    pytest.param(b'data: {"choices":null,"usage":{}}\n\n', K.FINAL, id="choices-null-final"),
    pytest.param(b'data: {"choices":{},"usage":{}}\n\n', K.FINAL, id="choices-not-a-list"),
    pytest.param(
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{}}\n\n',
        K.FINAL,
        id="finish-reason-final",
    ),
    pytest.param(
        b'data: {"choices":[{"finish_reason":null},{"finish_reason":"length"}],"usage":{}}\n\n',
        K.FINAL,
        id="any-choice-finished",
    ),
    pytest.param(
        b'data: {"choices":[{"delta":{"role":"assistant"},"finish_reason":null}],'
        b'"usage":{"prompt_tokens":9,"completion_tokens":0}}\n\n',
        K.USAGE,
        id="continuous-usage-role-chunk",
    ),
    pytest.param(
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":{}}\n\n', K.USAGE, id="no-finish"
    ),
    pytest.param(b'data: {"choices":["x"],"usage":{}}\n\n', K.USAGE, id="odd-choice"),
    pytest.param(b'data: {"x":1,\ndata: "usage":{}}\n\n', K.FINAL, id="usage-multiline"),
    pytest.param(b'event: m\r\nid: 9\r\ndata: {"usage":{}}\r\n\r\n', K.FINAL, id="usage-fields"),
    pytest.param(b'data: {"usage":{"n":1e400,"m":NaN}}\n\n', K.FINAL, id="lossless-parse"),
    pytest.param(b'data: {"usage":null}\n\n', K.PLAIN, id="usage-null"),
    pytest.param(b'data: {"usage": null}\n\n', K.PLAIN, id="usage-null-spaced"),
    pytest.param(b'data: {"usage" : null}\n\n', K.PLAIN, id="usage-null-odd-spacing"),
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
    stream = SseStream(CHAT)
    assert stream.feed(raw) == [SseEvent(raw, kind)]
    facts = stream.facts
    assert (facts.usage_seen, facts.error_seen, facts.done_seen) == (
        kind in USAGE_KINDS,
        kind is K.ERROR,
        kind is K.DONE,
    )


FINALS = [
    pytest.param({}, True, id="absent"),
    pytest.param({"choices": []}, True, id="empty"),
    pytest.param({"choices": "x"}, True, id="not-a-list"),
    pytest.param({"choices": [{"finish_reason": None}]}, False, id="unfinished"),
    pytest.param({"choices": [{"finish_reason": "tool_calls"}]}, True, id="finished"),
    pytest.param({"choices": [1, None]}, False, id="odd-entries"),
]


@pytest.mark.parametrize(("doc", "final"), FINALS)
def test_is_final(doc: dict[str, Any], final: bool) -> None:
    assert is_final(doc) is final


def test_every_usage_frame_is_usage_bearing() -> None:
    frame = b'data: {"usage":{"prompt_tokens":5}}\n\n'
    assert [e.kind for e in replay([frame * 3])] == [K.FINAL] * 3


# ---- the edit ----

RULE = UsageRule(Split(read=4, creation={Tier.H24: 5}))
INJECTED = (
    b'"prompt_tokens_details":{"cached_tokens":4},"cache_read_input_tokens":4,'
    b'"cache_creation_input_tokens":5,"cache_creation":{"ephemeral_5m_input_tokens":0,'
    b'"ephemeral_1h_input_tokens":0,"ephemeral_24h_input_tokens":5}'
)
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
        b'event: x\rdata: {"usage":\rdata: {"prompt_tokens":9,%s}}\r\r',
        id="cr-multiline-stays-multiline",
    ),
    pytest.param(
        b'data: {"id":1,\ndata: "usage":{"prompt_tokens":9},\ndata:  "n":1e400}\n\n',
        b'data: {"id":1,\ndata: "usage":{"prompt_tokens":9,%s},\ndata:  "n":1e400}\n\n',
        id="lines-around-the-usage-kept",
    ),
    pytest.param(
        b'data:{"usage":{\r\ndata:"prompt_tokens":9\n: between\ndata:}}\r\n\r\n',
        b': between\ndata:{"usage":{"prompt_tokens":9,%s}}\r\n\r\n',
        id="usage-over-three-lines-joined-in-the-last-ones-place",
    ),
    pytest.param(
        b'data:{"a":0,\r\ndata:  "usage":{"prompt_tokens":9}}\n\n',
        b'data:{"a":0,\r\ndata:  "usage":{"prompt_tokens":9,%s}}\n\n',
        id="nospace-then-a-spaced-line",
    ),
    pytest.param(
        b'data: {"usage":{"prompt_tokens":9,"x":1e400,"y":NaN,"z":"\\ud800"}}\n\n',
        b'data: {"usage":{"prompt_tokens":9,"x":1e400,"y":NaN,"z":"\\ud800",%s}}\n\n',
        id="hostile-values-kept",
    ),
    pytest.param(
        b'data: {"usage":{"prompt_tokens":9}}',
        b'data: {"usage":{"prompt_tokens":9,%s}}',
        id="no-line-ending",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), EDITS)
def test_edit_usage_event(raw: bytes, expected: bytes) -> None:
    edited = SseStream(CHAT).edit_usage_event(SseEvent(raw, K.FINAL), RULE)
    assert edited == expected % INJECTED
    assert_only_usage_changed(raw, edited)


SCRUBS = [
    pytest.param(
        b'data: {"usage":{"prompt_tokens":9,"cache_read_input_tokens":3}}\n\n',
        UsageRule(),
        b'data: {"usage":{"prompt_tokens":9}}\n\n',
        id="scrubbed",
    ),
    pytest.param(
        b'data: {"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":3}}}\n\n',
        UsageRule(),
        b'data: {"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":0}}}\n\n',
        id="cached-tokens-zeroed",
    ),
    pytest.param(
        b'data: {"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":30}}}\n\n',
        UsageRule(Split(), engine=True),
        b'data: {"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":9},'
        b'"cache_read_input_tokens":9,"cache_creation_input_tokens":0,"cache_creation":'
        b'{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0,'
        b'"ephemeral_24h_input_tokens":0}}}\n\n',
        id="engine-read-capped",
    ),
]


@pytest.mark.parametrize(("raw", "rule", "expected"), SCRUBS)
def test_edit_with_other_rules(raw: bytes, rule: UsageRule, expected: bytes) -> None:
    assert SseStream(CHAT).edit_usage_event(SseEvent(raw, K.USAGE), rule) == expected


UNCHANGED = [
    pytest.param(b'data: {"usage":{"prompt_tokens":9}}\n\n', UsageRule(), id="nothing-to-scrub"),
    pytest.param(
        b'data: {"usage":{"prompt_tokens":9,"cache_discount":1}}\n\n',
        UsageRule(scrub=False),
        id="scrubbing-off",
    ),
    pytest.param(
        b'data: {"usage":{"prompt_tokens":9,' + INJECTED + b"}}\n\n", RULE, id="already-edited"
    ),
]


@pytest.mark.parametrize(("raw", "rule"), UNCHANGED)
def test_edit_with_nothing_to_change_returns_the_same_bytes(raw: bytes, rule: UsageRule) -> None:
    [event] = SseStream(CHAT).feed(raw)
    assert SseStream(CHAT).edit_usage_event(event, rule) is event.raw


def test_edit_shows_the_split_capped() -> None:
    stream = SseStream(CHAT)
    [event] = stream.feed(b'data: {"usage":{"prompt_tokens":9}}\n\n')
    edited = stream.edit_usage_event(event, UsageRule(Split(read=10)))
    usage = codec.loads(edited.removeprefix(b"data: "))["usage"]
    assert usage["cache_read_input_tokens"] == 9
    assert usage["prompt_tokens_details"] == {"cached_tokens": 9}
    assert usage["prompt_tokens"] == 9


@pytest.mark.parametrize("kind", [pytest.param(k, id=k.value) for k in (K.PLAIN, K.DONE, K.ERROR)])
def test_edit_refuses_other_events(kind: Kind) -> None:
    with pytest.raises(ValueError, match=f"not a usage-bearing frame: {kind.value} event"):
        SseStream(CHAT).edit_usage_event(SseEvent(b"data: [DONE]\n\n", kind), RULE)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b": no data\n\n", id="no-data"),
        pytest.param(b"data: [1]\n\n", id="not-an-object"),
    ],
)
def test_edit_refuses_a_frame_without_a_json_object(raw: bytes) -> None:
    with pytest.raises(ValueError, match="carries no JSON object"):
        SseStream(CHAT).edit_usage_event(SseEvent(raw, K.FINAL), RULE)


# ---- oversized events ----

OVERSIZED = [
    pytest.param([b"data: " + b"x" * 100], id="partial-grows-past-cap"),
    pytest.param([b"data: a\n\n", b"data: " + b"x" * 100 + b"\n\n"], id="complete-in-one-chunk"),
    pytest.param([b"data: a\n\ndata: " + b"x" * 100 + b"\n\nrest"], id="after-a-good-event"),
    pytest.param([bytes([b]) for b in b": " + b"y" * 100], id="byte-by-byte"),
]


def _feed_all(stream: SseStream, pieces: list[bytes], out: list[SseEvent]) -> None:
    for piece in pieces:
        out += stream.feed(piece)


@pytest.mark.parametrize("pieces", OVERSIZED)
def test_oversized_event_raises_and_passes_everything_through(pieces: list[bytes]) -> None:
    stream, out = SseStream(CHAT, max_event_bytes=64), list[SseEvent]()
    fed = b"".join(pieces)
    with pytest.raises(EventTooLarge) as caught:
        _feed_all(stream, pieces, out)
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
        SseStream(CHAT).feed(event[:-2] + b"x\n\n")


# ---- properties ----

_EOLS = [b"\n", b"\r\n", b"\r"]
_REFERENCE_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)")
_text = st.text(st.characters(exclude_characters="\r\n", codec="utf-8"), max_size=12)
_payloads = st.one_of(
    st.builds(lambda t: codec.dumps({"choices": [{"delta": {"content": t}}]}), _text),
    st.builds(lambda t: codec.dumps({"choices": [], "usage": {"prompt_tokens": 9, "x": t}}), _text),
    st.builds(
        lambda t: codec.dumps({"choices": [{"delta": {"content": t}}], "usage": {"x": 1}}), _text
    ),
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


@given(chunked(streams))
def test_untouched_frames_come_out_byte_identical(case: tuple[bytes, list[bytes]]) -> None:
    _, pieces = case
    stream = SseStream(CHAT)
    events = replay(pieces, stream)
    out = [
        stream.edit_usage_event(e, GOLDEN_RULE) if e.kind in USAGE_KINDS else e.raw for e in events
    ]
    for event, sent in zip(events, out, strict=True):
        if event.kind in USAGE_KINDS:
            assert_only_usage_changed(event.raw, sent)
            usage = codec.loads(payload(event.raw))["usage"]
            assert codec.loads(payload(sent))["usage"] == edit_usage(usage, GOLDEN_RULE)
        else:
            assert sent is event.raw


values = st.sampled_from(["1", '"s"', "null", "[1,2]", '{"k":"v"}', "1e400", "NaN", '"\\ud800"'])
names = st.sampled_from(["id", "choices", "model", "x", "cached_tokens"])
usage_names = st.sampled_from(
    ["prompt_tokens", "completion_tokens", "cache_read_input_tokens", "cache_discount", "x"]
)


@st.composite
def usage_frames(draw: st.DrawFn) -> bytes:
    """One usage frame whose JSON is spread over data lines, with comments among them."""

    def gap() -> str:
        return draw(st.sampled_from(["", "", "\n", " ", "\n  "]))

    def members(keys: st.SearchStrategy[str]) -> list[str]:
        pairs = draw(st.dictionaries(keys, values, max_size=3))
        return [f'"{k}":{gap()}{v}' for k, v in pairs.items()]

    usage = "{" + gap() + f",{gap()}".join(members(usage_names)) + gap() + "}"
    parts = [*members(names), f'"usage":{gap()}{usage}', *members(names)]
    draw(st.randoms()).shuffle(parts)
    text = "{" + gap() + f",{gap()}".join(parts) + gap() + "}"
    lines = []
    eol = b"\n"
    for piece in text.split("\n"):
        if draw(st.integers(0, 3)) == 0:
            lines.append(draw(st.sampled_from([b": comment", b"id: 7", b"event: x"])) + eol)
        eol = draw(st.sampled_from(_EOLS))
        lines.append(draw(st.sampled_from([b"data:", b"data: "])) + spans.encode(piece) + eol)
    return b"".join(lines) + eol


usage_rules = st.sampled_from(
    [GOLDEN_RULE, UsageRule(), UsageRule(Split(read=5), engine=True), UsageRule(Split())]
)


@settings(max_examples=200)
@given(usage_frames(), usage_rules)
def test_usage_edit_touches_only_the_usage_value(raw: bytes, rule: UsageRule) -> None:
    stream = SseStream(CHAT)
    [event] = replay([raw], stream)
    assert event.kind in USAGE_KINDS
    edited = stream.edit_usage_event(event, rule)
    usage = spans.read(spans.decode(payload(raw)), spans.SHALLOW).get("usage")
    assert usage is not None
    expected = edit_usage(usage.value, rule)
    if expected is None:
        assert edited is event.raw
        return
    assert_only_usage_changed(raw, edited)
    new = spans.read(spans.decode(payload(edited)), spans.SHALLOW).get("usage")
    assert new is not None
    assert new.value == expected


PASSES_WHOLE = [
    pytest.param(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', True, id="content-frame"),
    pytest.param(b"data: a\n\ndata: b\n\n", True, id="two-whole-frames"),
    pytest.param(b": keep-alive\n\n", True, id="comment"),
    pytest.param(b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n', False, id="usage"),
    pytest.param(b'data: {"choices":[],"usage":null}\n\n', False, id="usage-null-still-scanned"),
    pytest.param(b'data: {"error":{"message":"x"}}\n\n', False, id="error"),
    pytest.param(b"data: [DONE]\n\n", False, id="done"),
    pytest.param(b"data: partial", False, id="no-blank-line"),
    pytest.param(b"data: a\r\n\r\n", False, id="crlf-ending-is-framed"),
    pytest.param(b"data: " + b"x" * (64 * 1024) + b"\n\n", False, id="larger-than-an-event"),
]


@pytest.mark.parametrize(("chunk", "whole"), PASSES_WHOLE)
def test_chunks_that_cannot_matter_pass_whole(chunk: bytes, whole: bool) -> None:
    assert SseStream(CHAT).passes_whole(chunk) is whole


def test_nothing_passes_whole_while_a_partial_event_is_held() -> None:
    stream = SseStream(CHAT)
    assert stream.feed(b"data: par") == []
    assert not stream.passes_whole(b"tial\n\ndata: b\n\n")
