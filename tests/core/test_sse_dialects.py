"""Golden SSE transcripts of the Messages and Responses APIs, as their engines send them (§12).

Each is replayed whole, byte by byte and split at every boundary; the edited goldens are what
the client gets with ``GOLDEN_RULE`` (or scrubbed), and their usage is checked against the
API's own arithmetic independently of the golden bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from extproc.core import codec
from extproc.core.answers import SseAnswer
from extproc.core.dialects import Answer, messages, responses
from extproc.core.model import Split, Tier
from extproc.core.sse import USAGE_KINDS, Kind, SseEvent, SseStream
from extproc.core.usage import UsageRule

TRANSCRIPTS = Path(__file__).parent / "transcripts"
GOLDEN_SPLIT = Split(read=1500, creation={Tier.M5: 300, Tier.H1: 100})
GOLDEN_RULE = UsageRule(GOLDEN_SPLIT)
NO_24H = UsageRule(GOLDEN_SPLIT, tiers=frozenset({Tier.M5, Tier.H1}))
SCRUB = UsageRule()
K = Kind
P = K.PLAIN

# dialect, name, kinds, (usage_seen, error_seen, completed)
GOLDEN = [
    pytest.param(
        "messages",
        "vllm_0_23",
        [K.USAGE, P, P, P, P, P, K.FINAL, K.STOP],
        (True, False, True),
        id="messages-vllm-0.23",
    ),
    pytest.param(
        "messages",
        "vllm_0_33_crlf",
        [K.USAGE, P, P, P, P, K.FINAL, K.STOP],
        (True, False, True),
        id="messages-vllm-0.33-crlf",
    ),
    pytest.param(
        "messages",
        "sglang",
        [K.USAGE, P, P, P, K.FINAL, K.STOP],
        (True, False, True),
        id="messages-sglang",
    ),
    pytest.param(
        "messages",
        "vllm_error",
        [K.USAGE, P, P, K.ERROR],
        (True, True, False),
        id="messages-vllm-error",
    ),
    pytest.param(
        "messages",
        "sglang_error",
        [K.USAGE, K.ERROR, K.STOP],
        (True, True, True),
        id="messages-sglang-error",
    ),
    pytest.param(
        "responses", "vllm", [*[P] * 10, K.FINAL], (True, False, True), id="responses-vllm"
    ),
    pytest.param(
        "responses",
        "incomplete_crlf",
        [*[P] * 9, K.FINAL],
        (True, False, True),
        id="responses-incomplete-crlf",
    ),
    pytest.param("responses", "aborted", [P, P, P], (False, False, False), id="responses-aborted"),
    pytest.param("responses", "failed", [P, K.ERROR], (False, True, False), id="responses-failed"),
]

# dialect, name, golden suffix, rule
RENDERS = [
    *[
        pytest.param(d, n, "edited", GOLDEN_RULE, id=f"{d}-{n}-edited")
        for d, n in [
            ("messages", "vllm_0_23"),
            ("messages", "vllm_0_33_crlf"),
            ("messages", "sglang"),
            ("responses", "vllm"),
            ("responses", "incomplete_crlf"),
        ]
    ],
    pytest.param("messages", "vllm_0_33_crlf", "scrubbed", SCRUB, id="messages-vllm-scrubbed"),
    pytest.param("messages", "sglang", "scrubbed", SCRUB, id="messages-sglang-scrubbed"),
    pytest.param("messages", "sglang", "no24h", NO_24H, id="messages-sglang-no-24h-tier"),
    pytest.param("responses", "vllm", "scrubbed", SCRUB, id="responses-vllm-scrubbed"),
    pytest.param("messages", "vllm_0_23", "", SCRUB, id="messages-nothing-to-scrub"),
    pytest.param("messages", "sglang", "", UsageRule(scrub=False), id="messages-scrub-off"),
]

READERS: dict[str, Callable[[], Answer]] = {
    "messages": messages.MessagesAnswer,
    "responses": responses.ResponsesAnswer,
}


def _golden(dialect: str, name: str, suffix: str = "") -> bytes:
    return (TRANSCRIPTS / dialect / f"{name}{'.' + suffix if suffix else ''}.sse").read_bytes()


def replay(pieces: Iterable[bytes], stream: SseStream) -> list[SseEvent]:
    events = [event for piece in pieces for event in stream.feed(piece)]
    return events + stream.flush()


def render(stream: SseStream, events: list[SseEvent], rule: UsageRule) -> bytes:
    return b"".join(
        stream.edit_usage_event(e, rule) if e.kind in USAGE_KINDS else e.raw for e in events
    )


def cut(data: bytes, at: int) -> list[bytes]:
    return [data[a:b] for a, b in itertools.pairwise([0, at, len(data)])]


@pytest.mark.parametrize(("dialect", "name", "kinds", "facts"), GOLDEN)
def test_transcript_whole_and_byte_by_byte(
    dialect: str, name: str, kinds: list[Kind], facts: tuple[bool, bool, bool]
) -> None:
    data = _golden(dialect, name)
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        stream = SseStream(READERS[dialect]())
        events = replay(pieces, stream)
        assert [e.kind for e in events] == kinds
        assert b"".join(e.raw for e in events) == data
        f = stream.facts
        assert (f.usage_seen, f.error_seen, f.completed, f.oversized) == (*facts, False)


@pytest.mark.parametrize(("dialect", "name", "kinds", "facts"), GOLDEN)
def test_transcript_split_at_every_boundary(
    dialect: str, name: str, kinds: list[Kind], facts: tuple[bool, bool, bool]
) -> None:
    data = _golden(dialect, name)
    whole = replay([data], SseStream(READERS[dialect]()))
    for at in range(len(data) + 1):
        assert replay(cut(data, at), SseStream(READERS[dialect]())) == whole, f"split at {at}"


@pytest.mark.parametrize(("dialect", "name", "suffix", "rule"), RENDERS)
def test_transcript_edit(dialect: str, name: str, suffix: str, rule: UsageRule) -> None:
    data = _golden(dialect, name)
    expected = _golden(dialect, name, suffix)
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        stream = SseStream(READERS[dialect]())
        assert render(stream, replay(pieces, stream), rule) == expected


def test_transcript_files_are_all_replayed() -> None:
    for dialect in READERS:
        names = {p.name.split(".")[0] for p in (TRANSCRIPTS / dialect).glob("*.sse")}
        assert names == {p.values[1] for p in GOLDEN if p.values[0] == dialect}
        edited = {p.name for p in (TRANSCRIPTS / dialect).glob("*.*.sse")}
        rendered = {f"{p.values[1]}.{p.values[2]}.sse" for p in RENDERS if p.values[0] == dialect}
        assert edited == {r for r in rendered if not r.endswith("..sse")}


# ---- the usage each API's client keeps, checked without the golden bytes ----


def _docs(data: bytes) -> list[dict[str, Any]]:
    out = []
    for line in data.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            out.append(codec.loads(line[5:]))
    return out


def _anthropic_kept_usage(data: bytes) -> dict[str, Any]:
    """What the Anthropic SDK keeps: message_start's usage, overwritten by message_delta's."""
    kept: dict[str, Any] = {}
    for doc in _docs(data):
        if doc["type"] == "message_start":
            kept = dict(doc["message"]["usage"])
        elif doc["type"] == "message_delta":
            kept |= doc["usage"]
    return kept


@pytest.mark.parametrize(
    ("name", "total"),
    [
        pytest.param("vllm_0_23", 2000, id="vllm-0.23"),
        pytest.param("vllm_0_33_crlf", 2000, id="vllm-0.33"),
        pytest.param("sglang", 2000, id="sglang"),
    ],
)
def test_messages_stream_split_adds_up_to_the_upstream_input(name: str, total: int) -> None:
    kept = _anthropic_kept_usage(_golden("messages", name, "edited"))
    assert kept["cache_read_input_tokens"] == 1500
    assert kept["cache_creation_input_tokens"] == 400
    assert kept["cache_creation"] == {
        "ephemeral_5m_input_tokens": 300,
        "ephemeral_1h_input_tokens": 100,
        "ephemeral_24h_input_tokens": 0,
    }
    read, created = kept["cache_read_input_tokens"], kept["cache_creation_input_tokens"]
    assert read + created + kept["input_tokens"] == total


@pytest.mark.parametrize("name", ["vllm_0_33_crlf", "sglang"])
def test_messages_stream_scrubbed_reports_the_whole_input(name: str) -> None:
    kept = _anthropic_kept_usage(_golden("messages", name, "scrubbed"))
    assert kept["input_tokens"] == 2000
    assert not {"cache_read_input_tokens", "cache_creation_input_tokens"} & set(kept)


def test_responses_stream_split_goes_to_the_details() -> None:
    final = _docs(_golden("responses", "vllm", "edited"))[-1]
    assert final["type"] == "response.completed"
    usage = final["response"]["usage"]
    assert usage["input_tokens"] == 2000
    assert usage["input_tokens_details"] == {"cached_tokens": 1500, "cache_write_tokens": 400}
    assert usage["cache_read_input_tokens"] == 1500
    assert usage["cache_creation_input_tokens"] == 400
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}


def test_responses_stream_scrubbed_zeroes_the_engine_read() -> None:
    docs = _docs(_golden("responses", "vllm", "scrubbed"))
    assert docs[-1]["response"]["usage"]["input_tokens_details"] == {"cached_tokens": 0}


# ---- waiting: message_start never waits, message_delta does ----


def test_message_start_passes_scrubbed_before_the_classification() -> None:
    data = _golden("messages", "sglang")
    answer = SseAnswer(messages.MessagesAnswer())
    start_end = data.index(b"\n\n") + 2
    answer.feed(data[:start_end], end_of_stream=False)
    out = answer.drain(known=False, rule=SCRUB)
    assert out is not None
    (doc,) = _docs(out)
    assert doc["message"]["usage"] == {"input_tokens": 2000, "output_tokens": 0}
    answer.feed(data[start_end:], end_of_stream=True)
    assert answer.drain(known=False, rule=SCRUB) is None  # the delta waits
    rest = answer.drain(known=True, rule=GOLDEN_RULE)
    assert rest is not None
    delta = next(d for d in _docs(rest) if d["type"] == "message_delta")
    assert delta["usage"]["input_tokens"] == 100  # the start's total, minus ours


def test_message_start_gets_the_split_when_it_is_known() -> None:
    answer = SseAnswer(messages.MessagesAnswer())
    answer.feed(_golden("messages", "vllm_0_23"), end_of_stream=True)
    out = answer.drain(known=True, rule=GOLDEN_RULE)
    assert out is not None
    start = _docs(out)[0]["message"]["usage"]
    assert (start["input_tokens"], start["cache_read_input_tokens"]) == (100, 1500)


def test_responses_earlier_events_never_wait() -> None:
    data = _golden("responses", "vllm")
    answer = SseAnswer(responses.ResponsesAnswer())
    last = data.rindex(b"event: response.completed")
    answer.feed(data[:last], end_of_stream=False)
    assert answer.drain(known=False, rule=SCRUB) == data[:last]
    answer.feed(data[last:], end_of_stream=True)
    assert answer.drain(known=False, rule=SCRUB) is None
