"""The OpenAI Responses dialect: blocks, markers, forwarded bytes and usage (§12.2)."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.core import codec, request
from extproc.core.dialects import responses
from extproc.core.errors import MarkerError, RejectReason
from extproc.core.markers import error_envelope
from extproc.core.model import RequestPolicy, Split, Tier
from extproc.core.prefix import Breakpoint
from extproc.core.usage import UsageRule

POLICY = RequestPolicy()
EPH: dict[str, Any] = {"type": "ephemeral"}
H1: dict[str, Any] = {"type": "ephemeral", "ttl": "1h"}
TOOL: dict[str, Any] = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
CALL: dict[str, Any] = {
    "type": "function_call",
    "call_id": "call_1",
    "name": "lookup",
    "arguments": "{}",
}
OUTPUT: dict[str, Any] = {"type": "function_call_output", "call_id": "call_1", "output": "42"}


def _prepare(body: dict[str, Any] | bytes, walked: bool = False) -> request.Prepared:
    raw = body if isinstance(body, bytes) else codec.dumps(body)
    run = request.prepare_walked if walked else request.prepare
    prepared = run(raw, POLICY, dialect=responses.DIALECT)
    assert prepared is not None
    return prepared


def _part(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "input_text", "text": text, **extra}


BLOCKS = [
    pytest.param(
        {"instructions": "be brief", "input": "hi"},
        [("system", "text", "instructions", "be brief"), ("user", "text", "input", "hi")],
        id="string-instructions-and-input",
    ),
    pytest.param(
        {
            "tools": [TOOL],
            "input": [
                {"role": "developer", "content": "rules"},
                {"type": "message", "role": "user", "content": [_part("q")]},
                CALL,
                OUTPUT,
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "done", "annotations": []}],
                },
            ],
        },
        [
            ("tool_definition", "function", "tools[0]", codec.canonical(TOOL).decode()),
            ("developer", "text", "input[0].content", "rules"),
            ("user", "input_text", "input[1].content[0]", "q"),
            ("tool_call", "function_call", "input[2]", codec.canonical(CALL).decode()),
            ("tool", "function_call_output", "input[3]", codec.canonical(OUTPUT).decode()),
            ("assistant", "output_text", "input[4].content[0]", "done"),
        ],
        id="items-in-order",
    ),
    pytest.param(
        {
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}],
                }
            ]
        },
        [("user", "input_image", "input[0].content[0]", "")],
        id="image-empty-segment",
    ),
]


@pytest.mark.parametrize(("body", "expected"), BLOCKS)
def test_blocks_in_order(body: dict[str, Any], expected: list[tuple[str, str, str, str]]) -> None:
    prepared = _prepare(body, walked=True)
    assert [(b.role, b.kind, b.where, b.text) for b in prepared.blocks] == expected
    assert prepared.route == "responses"


def test_markers_on_parts_tools_items_and_top_level_are_stripped_byte_for_byte() -> None:
    raw = (
        b'{"model":"m","tools":[{"type":"function","name":"t","cache_control":{"type":"ephemeral"}}],'
        b'"input":[{"role":"user","content":"big doc","cache_control":{"type":"ephemeral",'
        b'"ttl":"1h"}},{"type":"function_call","call_id":"c","name":"t","arguments":"{}",'
        b'"cache_control":{"type":"ephemeral"}},{"role":"user","content":[{"type":"input_text",'
        b'"text":"q"}]}],"cache_control":{"type":"ephemeral"},"stream":true}'
    )
    prepared = _prepare(raw)
    assert prepared.body == (
        b'{"model":"m","tools":[{"type":"function","name":"t"}],'
        b'"input":[{"role":"user","content":"big doc"},{"type":"function_call","call_id":"c",'
        b'"name":"t","arguments":"{}"},{"role":"user","content":[{"type":"input_text",'
        b'"text":"q"}]}],"stream":true}'
    )
    assert prepared.breakpoints == (
        Breakpoint(0, Tier.M5),
        Breakpoint(1, Tier.H1),
        Breakpoint(2, Tier.M5),
        Breakpoint(3, Tier.M5, automatic=True),
    )
    assert b"stream_options" not in prepared.body


def test_a_parts_own_marker_wins_over_its_items() -> None:
    body = {
        "input": [{"role": "user", "cache_control": EPH, "content": [_part("a", cache_control=H1)]}]
    }
    prepared = _prepare(body)
    assert prepared.breakpoints == (Breakpoint(0, Tier.H1),)
    assert b"cache_control" not in prepared.body


def test_an_overridden_item_marker_is_still_validated() -> None:
    body = {
        "input": [
            {
                "role": "user",
                "cache_control": {"type": "x"},
                "content": [_part("a", cache_control=H1)],
            }
        ]
    }
    with pytest.raises(MarkerError) as caught:
        _prepare(body)
    assert caught.value.reason is RejectReason.UNSUPPORTED_TYPE


SHADOWED_INPUTS = [
    pytest.param(
        b'{"input":[{"role":"user","content":"a","cache_control":{"type":"x"}}],"input":"b"}',
        id="message-item-marker",
    ),
    pytest.param(
        b'{"input":[{"role":"developer","cache_control":{}}],"input":[{"role":"user",'
        b'"content":"b"}]}',
        id="message-item-without-blocks",
    ),
    pytest.param(
        b'{"input":[{"type":"function_call","cache_control":{"type":"x"}}],"input":"b"}',
        id="other-item-marker",
    ),
]


@pytest.mark.parametrize("raw", SHADOWED_INPUTS)
def test_the_markers_of_a_shadowed_input_are_cut_not_read(raw: bytes) -> None:
    # of duplicate "input" members the last is the one read: the first one's markers go
    # (they are stripped), but they are not validated, whatever the item
    prepared = _prepare(raw)
    assert b"cache_control" not in prepared.body
    assert prepared.breakpoints == ()


def test_the_400_is_the_openai_envelope() -> None:
    with pytest.raises(MarkerError) as caught:
        _prepare({"input": [{"role": "user", "content": [_part("a", cache_control="x")]}]})
    assert responses.DIALECT.error_envelope(caught.value) == error_envelope(caught.value)
    assert codec.loads(error_envelope(caught.value))["error"]["code"] == "invalid_cache_control"


SPLIT = Split(read=1500, creation={Tier.M5: 300, Tier.H1: 100})
USAGE_CASES = [
    pytest.param(
        {
            "input_tokens": 2000,
            "input_tokens_details": {"cached_tokens": 1024},
            "output_tokens": 3,
            "total_tokens": 2003,
        },
        UsageRule(SPLIT),
        {
            "input_tokens": 2000,
            "input_tokens_details": {"cached_tokens": 1500, "cache_write_tokens": 400},
            "output_tokens": 3,
            "total_tokens": 2003,
            "cache_read_input_tokens": 1500,
            "cache_creation_input_tokens": 400,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 300,
                "ephemeral_1h_input_tokens": 100,
                "ephemeral_24h_input_tokens": 0,
            },
        },
        id="split-replaces-the-engine-read",
    ),
    pytest.param(
        {"input_tokens": 1600, "input_tokens_details": None, "output_tokens": 3},
        UsageRule(SPLIT),
        {
            "input_tokens": 1600,
            "input_tokens_details": {"cached_tokens": 1200, "cache_write_tokens": 400},
            "output_tokens": 3,
            "cache_read_input_tokens": 1200,
            "cache_creation_input_tokens": 400,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 300,
                "ephemeral_1h_input_tokens": 100,
                "ephemeral_24h_input_tokens": 0,
            },
        },
        id="capped-to-input-tokens",
    ),
    pytest.param(
        {
            "input_tokens": 2000,
            "input_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 976},
            "output_tokens": 3,
        },
        UsageRule(),
        {
            "input_tokens": 2000,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": 3,
        },
        id="inactive-scrubs-the-engine-numbers",
    ),
    pytest.param(
        {"input_tokens": 2000, "input_tokens_details": {"cached_tokens": 1024}, "output_tokens": 3},
        UsageRule(Split(), engine=True),
        {
            "input_tokens": 2000,
            "input_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 0},
            "output_tokens": 3,
            "cache_read_input_tokens": 1024,
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


@pytest.mark.parametrize(("usage", "rule", "expected"), USAGE_CASES)
def test_json_usage(usage: dict[str, Any], rule: UsageRule, expected: dict[str, Any]) -> None:
    body = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "error": None,
        "usage": usage,
    }
    edit = responses.ResponsesAnswer().edit_body(codec.dumps(body).decode(), rule)
    assert edit is not None
    assert (edit.usage_seen, edit.error_seen) == (True, False)
    assert edit.text is not None
    assert codec.loads(edit.text)["usage"] == expected


def test_a_failed_response_is_an_error() -> None:
    text = '{"object":"response","status":"failed","error":{"code":"server_error"},"usage":null}'
    edit = responses.ResponsesAnswer().edit_body(text, UsageRule(SPLIT))
    assert edit is not None
    assert (edit.text, edit.usage_seen, edit.error_seen) == (None, False, True)
