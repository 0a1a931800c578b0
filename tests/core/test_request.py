"""``prepare``: parse once, validate, hash, strip, and forward identical bytes when unchanged."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.core import codec
from extproc.core.errors import MarkerError, RejectReason
from extproc.core.model import Tier, TierPolicy
from extproc.core.prefix import Block, Breakpoint, prefix_hashes
from extproc.core.request import prepare

POLICY = TierPolicy()
EPH = {"type": "ephemeral"}


def _body(**fields: Any) -> bytes:
    return codec.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


UNCHANGED = [
    pytest.param(_body(), id="plain"),
    pytest.param(_body(stream=False), id="stream-false"),
    pytest.param(_body(stream=True, stream_options={"include_usage": True}), id="usage-on"),
    pytest.param(b'{ "model" : "m",\n  "messages": [] }\n', id="odd-whitespace-kept"),
    pytest.param(b'{"messages":[{"role":"user","content":"\\u00e9\\/"}]}', id="escapes-kept"),
    pytest.param(b"{}", id="empty-object"),
    pytest.param(b'{"messages": "text"}', id="messages-not-a-list"),
    pytest.param(b'{"messages": [1, "x", null]}', id="non-object-messages"),
]


@pytest.mark.parametrize("raw", UNCHANGED)
def test_unchanged_body_is_the_same_bytes(raw: bytes) -> None:
    prepared = prepare(raw, POLICY)
    assert prepared is not None
    assert prepared.body is raw
    assert not prepared.changed
    assert not prepared.had_markers


CHANGED = [
    pytest.param(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": EPH}]}
            ]
        },
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
        True,
        id="marker",
    ),
    pytest.param(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": None}]}
            ]
        },
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
        False,
        id="null-marker",
    ),
    pytest.param(
        {"stream": True, "stream_options": {"x": 1}},
        {"stream": True, "stream_options": {"x": 1, "include_usage": True}},
        False,
        id="stream-usage-forced",
    ),
]


@pytest.mark.parametrize(("body", "forwarded", "had_markers"), CHANGED)
def test_changed_body_is_reserialised(
    body: dict[str, Any], forwarded: dict[str, Any], had_markers: bool
) -> None:
    prepared = prepare(codec.dumps(body), POLICY)
    assert prepared is not None
    assert prepared.changed
    assert prepared.had_markers is had_markers
    assert codec.loads(prepared.body) == forwarded


NOT_OBJECTS = [
    pytest.param(b"", id="empty"),
    pytest.param(b"{", id="truncated"),
    pytest.param(b"not json", id="text"),
    pytest.param(b'{"a":1} x', id="trailing-garbage"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
    pytest.param(b"[]", id="array"),
    pytest.param(b'"s"', id="string"),
    pytest.param(b"1", id="number"),
    pytest.param(b"null", id="null"),
]


@pytest.mark.parametrize("raw", NOT_OBJECTS)
def test_not_a_json_object_is_none(raw: bytes) -> None:
    assert prepare(raw, POLICY) is None


FIELDS = [
    pytest.param({"model": "qwen", "stream": True}, "qwen", True, id="model-and-stream"),
    pytest.param({"model": 5, "stream": "yes"}, None, False, id="wrong-types"),
    pytest.param({"stream": 1}, None, False, id="missing-model"),
]


@pytest.mark.parametrize(("body", "model", "stream"), FIELDS)
def test_model_and_stream(body: dict[str, Any], model: str | None, stream: bool) -> None:
    prepared = prepare(codec.dumps(body), POLICY)
    assert prepared is not None
    assert (prepared.model, prepared.stream) == (model, stream)


def test_blocks_hashes_and_breakpoints() -> None:
    messages = [
        {"role": "system", "content": "static system"},
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "doc",
                    "cache_control": {"type": "ephemeral", "ttl": "1h"},
                },
                {"type": "text", "text": "question", "cache_control": EPH},
            ],
        },
    ]
    prepared = prepare(codec.dumps({"model": "m", "messages": messages}), POLICY)
    assert prepared is not None
    assert prepared.blocks == (
        Block("system", "text", "static system", None),
        Block("user", "text", "doc", Tier.H1),
        Block("user", "text", "question", Tier.M5),
    )
    assert prepared.breakpoints == (Breakpoint(1, Tier.H1), Breakpoint(2, Tier.M5))
    assert prepared.hashes[0].hex() == (
        "3f64b6de25662606fce3fdbfc38c06d90282a10f28a6a12496225051481cf3e2"
    )
    assert prepared.hashes == prefix_hashes(codec.loads(prepared.body)["messages"])


REJECTED = [
    pytest.param(
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a", "cache_control": {"type": "x"}}],
            }
        ],
        RejectReason.UNSUPPORTED_TYPE,
        id="unsupported-type",
    ),
    pytest.param(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": str(i), "cache_control": EPH} for i in range(5)
                ],
            }
        ],
        RejectReason.TOO_MANY_BREAKPOINTS,
        id="too-many",
    ),
]


@pytest.mark.parametrize(("messages", "reason"), REJECTED)
def test_invalid_markers_raise(messages: list[Any], reason: RejectReason) -> None:
    with pytest.raises(MarkerError) as caught:
        prepare(codec.dumps({"model": "m", "messages": messages}), POLICY)
    assert caught.value.reason is reason


def test_disabled_default_tier_policy_applies() -> None:
    policy = TierPolicy(enabled=frozenset({Tier.H1}), default=Tier.H1)
    messages = [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": EPH}]}]
    prepared = prepare(codec.dumps({"messages": messages}), policy)
    assert prepared is not None
    assert prepared.breakpoints == (Breakpoint(0, Tier.H1),)


block_st = st.fixed_dictionaries(
    {"type": st.just("text"), "text": st.text(max_size=6)},
    optional={"cache_control": st.none() | st.just(EPH)},
)
message_st = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user"]),
        "content": st.text(max_size=6) | st.lists(block_st, max_size=2),
    }
)


@settings(deadline=None)
@given(st.lists(message_st, max_size=2), st.booleans())
def test_forwarded_body_has_no_markers_and_same_hashes(messages: list[Any], stream: bool) -> None:
    prepared = prepare(codec.dumps({"messages": messages, "stream": stream}), POLICY)
    assert prepared is not None
    forwarded = codec.loads(prepared.body)
    assert prepared.hashes == prefix_hashes(messages) == prefix_hashes(forwarded["messages"])
    assert b"cache_control" not in prepared.body
    assert prepared.stream is stream
    assert (forwarded.get("stream_options") == {"include_usage": True}) is stream
    assert len(prepared.blocks) == len(prepared.hashes)
