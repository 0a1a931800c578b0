"""The Anthropic Messages dialect: blocks, markers, forwarded bytes, the 400 and usage (§12.1)."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.core import codec, request
from extproc.core.dialects import messages
from extproc.core.errors import MarkerError, RejectReason
from extproc.core.model import RequestPolicy, Split, Tier, TierPolicy
from extproc.core.prefix import Block, Breakpoint, object_body, prefix_hashes, string_body
from extproc.core.usage import UsageRule

POLICY = RequestPolicy()
EPH: dict[str, Any] = {"type": "ephemeral"}
H1: dict[str, Any] = {"type": "ephemeral", "ttl": "1h"}
TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"cache_control": {"type": "string"}}},
}
USE: dict[str, Any] = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
RESULT: dict[str, Any] = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}
THINKING: dict[str, Any] = {"type": "thinking", "thinking": "Let me see.", "signature": "c2ln"}
IMAGE: dict[str, Any] = {
    "type": "image",
    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
}
BILLING = "x-anthropic-billing-header: cc_version=2.1; cch=77aa;"


def _prepare(body: dict[str, Any] | bytes, policy: RequestPolicy = POLICY) -> request.Prepared:
    raw = body if isinstance(body, bytes) else codec.dumps(body)
    prepared = request.prepare(raw, policy, dialect=messages.DIALECT)
    assert prepared is not None
    return prepared


def _text(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": text, **extra}


BLOCKS = [
    pytest.param(
        {"system": "be brief", "messages": [{"role": "user", "content": "hi"}]},
        [("system", "text", "system", "be brief"), ("user", "text", "messages[0].content", "hi")],
        id="string-system-and-content",
    ),
    pytest.param(
        {
            "tools": [{**TOOL, "cache_control": EPH}],
            "system": [_text("one"), _text("two", cache_control=H1)],
            "messages": [{"role": "user", "content": [_text("q")]}],
        },
        [
            ("tool_definition", "", "tools[0]", codec.canonical(TOOL).decode()),
            ("system", "text", "system[0]", "one"),
            ("system", "text", "system[1]", "two"),
            ("user", "text", "messages[0].content[0]", "q"),
        ],
        id="tools-then-system-then-messages",
    ),
    pytest.param(
        {
            "messages": [
                {"role": "user", "content": [_text("q"), IMAGE]},
                {"role": "assistant", "content": [THINKING, _text("calling"), USE]},
                {"role": "user", "content": [RESULT]},
            ]
        },
        [
            ("user", "text", "messages[0].content[0]", "q"),
            ("user", "image", "messages[0].content[1]", ""),
            ("assistant", "thinking", "messages[1].content[0]", "Let me see."),
            ("assistant", "text", "messages[1].content[1]", "calling"),
            ("assistant", "tool_use", "messages[1].content[2]", codec.canonical(USE).decode()),
            ("user", "tool_result", "messages[2].content[0]", codec.canonical(RESULT).decode()),
        ],
        id="segments-per-block-type",
    ),
    pytest.param(
        {"system": [_text(BILLING), _text("static")], "messages": []},
        [("system", "text", "system[1]", "static")],
        id="telemetry-block-left-out",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": None}, {"content": "x"}]},
        [("", "text", "messages[1].content", "x")],
        id="null-content-and-missing-role",
    ),
]


@pytest.mark.parametrize(("body", "expected"), BLOCKS)
def test_blocks_in_anthropic_prefix_order(
    body: dict[str, Any], expected: list[tuple[str, str, str, str]]
) -> None:
    prepared = request.prepare_walked(codec.dumps(body), POLICY, dialect=messages.DIALECT)
    assert prepared is not None
    assert [(b.role, b.kind, b.where, b.text) for b in prepared.blocks] == expected
    assert prepared.route == "messages"


def test_hashes_follow_the_shared_definition() -> None:
    body = {"system": "static system", "messages": [{"role": "user", "content": "hi"}]}
    prepared = request.prepare_walked(codec.dumps(body), POLICY, dialect=messages.DIALECT)
    assert prepared is not None
    blocks = [
        Block("system", "text", "static system", string_body("static system"), "system"),
        Block("user", "text", "hi", string_body("hi"), "messages[0].content"),
    ]
    assert prepared.hashes == prefix_hashes(blocks)
    # the same content as a chat request hashes the same (the DESIGN §3 example)
    assert prepared.hashes[1].hex() == (
        "b063c46136d7e666f8ff6dfbb59370f23dd93a60e692faceb73da98351330939"
    )


def test_markers_are_breakpoints_and_stripped_byte_for_byte() -> None:
    raw = (
        b'{"model":"m","max_tokens":1e400,"tools":[{"name":"t","input_schema":{},'
        b'"cache_control":{"type":"ephemeral"}}],"system":[{"type":"text","text":"s",'
        b'"cache_control":{"type":"ephemeral","ttl":"1h"}}],"messages":[{"role":"user",'
        b'"content":[{"type":"text","text":"q","cache_control":null}]}],'
        b'"cache_control":{"type":"ephemeral"},"stream":true}'
    )
    prepared = _prepare(raw)
    assert prepared.body == (
        b'{"model":"m","max_tokens":1e400,"tools":[{"name":"t","input_schema":{}}],'
        b'"system":[{"type":"text","text":"s"}],"messages":[{"role":"user",'
        b'"content":[{"type":"text","text":"q"}]}],"stream":true}'
    )
    assert prepared.breakpoints == (
        Breakpoint(0, Tier.M5),
        Breakpoint(1, Tier.H1),
        Breakpoint(2, Tier.M5, automatic=True),
    )
    assert prepared.stream is True
    assert b"stream_options" not in prepared.body


def test_a_body_without_markers_passes_as_the_same_bytes() -> None:
    raw = codec.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    )
    prepared = _prepare(raw)
    assert prepared.body is raw
    assert not prepared.changed


def test_markers_elsewhere_are_content() -> None:
    body = {
        "tools": [TOOL],
        "messages": [
            {
                "role": "user",
                "cache_control": EPH,
                "content": [{**RESULT, "content": [_text("inner", cache_control=EPH)]}],
            }
        ],
    }
    raw = codec.dumps(body)
    prepared = _prepare(raw)
    assert prepared.body is raw
    assert prepared.breakpoints == ()


REJECTED = [
    pytest.param(
        {"messages": [{"role": "assistant", "content": [{**THINKING, "cache_control": EPH}]}]},
        RejectReason.MARKER_NOT_ALLOWED,
        'cache_control cannot be set on a "thinking" block',
        id="thinking",
    ),
    pytest.param(
        {"system": [_text("s", cache_control={"type": "persistent"})]},
        RejectReason.UNSUPPORTED_TYPE,
        'unsupported cache_control type: "persistent" (only "ephemeral")',
        id="unsupported-type",
    ),
    pytest.param(
        {"tools": [{**TOOL, "cache_control": {"type": "ephemeral", "ttl": "2h"}}]},
        RejectReason.INVALID_TTL,
        'invalid cache_control ttl: "2h"',
        id="invalid-ttl",
    ),
    pytest.param(
        {"system": [_text(str(i), cache_control=EPH) for i in range(5)]},
        RejectReason.TOO_MANY_BREAKPOINTS,
        "too many cache_control breakpoints (max 4)",
        id="too-many",
    ),
    pytest.param(
        {"system": [_text("s", cache_control=EPH)], "cache_control": H1},
        RejectReason.AUTOMATIC_TTL_CONFLICT,
        "top-level cache_control ttl conflicts with the explicit cache_control on the last block",
        id="automatic-conflict",
    ),
]


@pytest.mark.parametrize(("body", "reason", "message"), REJECTED)
def test_bad_markers_are_refused(body: dict[str, Any], reason: RejectReason, message: str) -> None:
    with pytest.raises(MarkerError) as caught:
        _prepare(body)
    assert (caught.value.reason, caught.value.message) == (reason, message)


def test_the_400_is_anthropics_envelope() -> None:
    with pytest.raises(MarkerError) as caught:
        _prepare({"system": [_text("s", cache_control=[])]})
    assert codec.loads(messages.error_envelope(caught.value)) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": 'cache_control must be an object with a string "type": "ephemeral" '
            '(and an optional string "ttl")',
        },
    }


def test_a_null_marker_on_a_thinking_block_is_only_stripped() -> None:
    body = {"messages": [{"role": "assistant", "content": [{**THINKING, "cache_control": None}]}]}
    prepared = _prepare(body)
    assert codec.loads(prepared.body) == {
        "messages": [{"role": "assistant", "content": [THINKING]}]
    }
    assert prepared.blocks[0].body == object_body(THINKING)


# ---- usage of a JSON answer ----

SPLIT = Split(read=1500, creation={Tier.M5: 300, Tier.H1: 100})
USAGE_CASES = [
    pytest.param(
        {"input_tokens": 2000, "output_tokens": 5},
        UsageRule(SPLIT),
        {
            "input_tokens": 100,
            "output_tokens": 5,
            "cache_creation_input_tokens": 400,
            "cache_read_input_tokens": 1500,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 300,
                "ephemeral_1h_input_tokens": 100,
                "ephemeral_24h_input_tokens": 0,
            },
        },
        id="whole-prompt-as-input",
    ),
    pytest.param(
        {
            "input_tokens": 0,
            "output_tokens": 5,
            "cache_read_input_tokens": 1024,
            "cache_creation_input_tokens": 976,
        },
        UsageRule(SPLIT, tiers=frozenset({Tier.M5, Tier.H1})),
        {
            "input_tokens": 100,
            "output_tokens": 5,
            "cache_read_input_tokens": 1500,
            "cache_creation_input_tokens": 400,
            "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 100},
        },
        id="engine-subtracted-its-own-no-24h",
    ),
    pytest.param(
        {"input_tokens": 300, "output_tokens": 1},
        UsageRule(SPLIT),
        {
            "input_tokens": 300,
            "output_tokens": 1,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 0,
                "ephemeral_1h_input_tokens": 0,
                "ephemeral_24h_input_tokens": 0,
            },
        },
        id="creation-above-total-reports-zeros",
    ),
    pytest.param(
        {"input_tokens": 1488, "cache_read_input_tokens": 512, "output_tokens": 1},
        UsageRule(),
        {"input_tokens": 2000, "output_tokens": 1},
        id="inactive-scrubbed-to-the-total",
    ),
    pytest.param(
        {"input_tokens": 1488, "cache_read_input_tokens": 512, "output_tokens": 1},
        UsageRule(Split(), engine=True),
        {
            "input_tokens": 1488,
            "cache_read_input_tokens": 512,
            "output_tokens": 1,
            "cache_creation_input_tokens": 0,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 0,
                "ephemeral_1h_input_tokens": 0,
                "ephemeral_24h_input_tokens": 0,
            },
        },
        id="engine-read",
    ),
]


@pytest.mark.parametrize(
    ("usage", "total"),
    [
        pytest.param({"input_tokens": 5, "output_tokens": 1}, 5, id="input-only"),
        pytest.param(
            {"input_tokens": 1, "cache_read_input_tokens": 2, "cache_creation_input_tokens": 3},
            6,
            id="all-three",
        ),
        pytest.param({"output_tokens": 1}, None, id="none"),
        pytest.param({"input_tokens": None, "output_tokens": 1}, None, id="null-is-absent"),
        pytest.param({"input_tokens": True, "cache_read_input_tokens": 4}, 4, id="not-a-count"),
    ],
)
def test_upstream_total(usage: dict[str, Any], total: int | None) -> None:
    assert messages.upstream_total(usage) == total


@pytest.mark.parametrize(("usage", "rule", "expected"), USAGE_CASES)
def test_json_usage(usage: dict[str, Any], rule: UsageRule, expected: dict[str, Any]) -> None:
    body = {"id": "msg_1", "type": "message", "content": [], "usage": usage}
    edit = messages.MessagesAnswer().edit_body(codec.dumps(body).decode(), rule)
    assert edit is not None
    assert edit.usage_seen
    assert edit.text is not None
    assert codec.loads(edit.text)["usage"] == expected


def test_json_without_cache_fields_stays_byte_identical_when_inactive() -> None:
    text = '{"type":"message","usage":{"input_tokens":7,"output_tokens":1}}'
    edit = messages.MessagesAnswer().edit_body(text, UsageRule())
    assert edit is not None
    assert edit.text is None


def test_json_error_envelope_is_an_error() -> None:
    text = '{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'
    edit = messages.MessagesAnswer().edit_body(text, UsageRule(SPLIT))
    assert edit is not None
    assert (edit.usage_seen, edit.error_seen) == (False, True)


def test_a_disabled_tier_is_refused_with_the_reference_message() -> None:
    policy = RequestPolicy(TierPolicy(enabled=frozenset({Tier.M5, Tier.H1})))
    body = {"system": [_text("s", cache_control={"type": "ephemeral", "ttl": "24h"})]}
    with pytest.raises(MarkerError, match="ttl tier '24h' is not currently available"):
        _prepare(body, policy)
