"""Where blocks, markers and telemetry are in a chat body, and the cuts that strip them (§3.0).

Forwarded texts are spelled out byte for byte: a cut removes a member or an element with one
separating comma and nothing else.
"""

from __future__ import annotations

from typing import Any

import pytest

from extproc.core import codec, spans
from extproc.core.dialects import chat
from extproc.core.dialects.chat import Layout, Telemetry
from extproc.core.model import RequestPolicy
from extproc.core.prefix import object_body, string_body

DEFAULT = RequestPolicy()
KEEP_TELEMETRY = RequestPolicy(strip_telemetry=False)
EPH: dict[str, Any] = {"type": "ephemeral"}
H1: dict[str, Any] = {"type": "ephemeral", "ttl": "1h"}
TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"cache_control": {"type": "string"}}},
    },
}
CALL: dict[str, Any] = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "lookup", "arguments": "{}"},
}
BILLING = "x-anthropic-billing-header: cc_version=1.0; cch=9f2a;"


def _layout(text: str, policy: RequestPolicy = DEFAULT) -> tuple[Layout, str]:
    root = spans.read(text, chat.SHAPE)
    splice = spans.Splice()
    found = chat.layout(root, policy, splice)
    return found, splice.apply(text)


def _blocks(blocks: str) -> str:
    """A body whose one user message has ``blocks`` (JSON text) as its array content."""
    return '{"messages":[{"role":"user","content":[' + blocks + "]}]}"


def _text(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": text, **extra}


def _sites(body: dict[str, Any] | str) -> list[tuple[str, str, str, object]]:
    text = body if isinstance(body, str) else codec.dumps(body).decode()
    found, _ = _layout(text)
    return [(s.role, s.kind, s.where, s.marker) for s in found.sites]


BLOCK_ORDER = [
    pytest.param(
        {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL, {**TOOL, "x": 1}]},
        [
            ("tool_definition", "function", "tools[0]", None),
            ("tool_definition", "function", "tools[1]", None),
            ("user", "text", "messages[0].content", None),
        ],
        id="tools-first-wherever-they-are",
    ),
    pytest.param(
        {
            "messages": [
                {"tool_calls": [CALL, {**CALL, "cache_control": H1}], "role": "assistant"},
                {"role": "assistant", "content": [_text("a")], "tool_calls": [CALL]},
            ]
        },
        [
            ("tool_call", "function", "messages[0].tool_calls[0]", None),
            ("tool_call", "function", "messages[0].tool_calls[1]", H1),
            ("assistant", "text", "messages[1].content[0]", None),
            ("tool_call", "function", "messages[1].tool_calls[0]", None),
        ],
        id="assistant-tool-calls-after-content",
    ),
    pytest.param(
        '{"messages":[{"role":"assistant","tool_calls":[{"id":"c"}],"content":"after"}]}',
        [
            ("assistant", "text", "messages[0].content", None),
            ("tool_call", "", "messages[0].tool_calls[0]", None),
        ],
        id="content-first-even-when-written-after",
    ),
    pytest.param(
        {
            "messages": [
                {"role": role, "content": "x", "tool_calls": [{**CALL, "cache_control": EPH}]}
                for role in ("user", "tool", "system", "Assistant")
            ]
        },
        [
            ("user", "text", "messages[0].content", None),
            ("tool", "text", "messages[1].content", None),
            ("system", "text", "messages[2].content", None),
            ("Assistant", "text", "messages[3].content", None),
        ],
        id="tool-calls-of-other-roles-are-not-blocks",
    ),
    pytest.param(
        {
            "messages": [
                {"role": "user", "content": [_text("a", cache_control=EPH), {"type": "image_url"}]}
            ]
        },
        [
            ("user", "text", "messages[0].content[0]", EPH),
            ("user", "image_url", "messages[0].content[1]", None),
        ],
        id="array-content",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": ["plain", 3, None, [1]]}]},
        [("user", "", f"messages[0].content[{i}]", None) for i in range(4)],
        id="non-object-elements-are-blocks",
    ),
    pytest.param(
        {"tools": ["x", 1], "messages": []},
        [("tool_definition", "", "tools[0]", None), ("tool_definition", "", "tools[1]", None)],
        id="non-object-tool-entries-are-blocks",
    ),
    pytest.param(
        {
            "messages": [
                {"role": 7, "content": "x"},
                {"content": "y"},
                {"role": None, "content": "z"},
            ]
        },
        [("", "text", f"messages[{i}].content", None) for i in range(3)],
        id="non-string-role-is-empty",
    ),
    pytest.param(
        '{"messages":[{"role":NaN,"content":[{"type":NaN,"text":1e400}]}],"tools":[{"type":NaN}]}',
        [
            ("tool_definition", "", "tools[0]", None),
            ("", "", "messages[0].content[0]", None),
        ],
        id="literals-are-not-strings",
    ),
    pytest.param(
        {
            "messages": [
                {"role": "user", "content": None},
                {"role": "user"},
                {"role": "user", "content": 5},
                "junk",
                {"role": "user", "content": []},
                {"role": "user", "content": {"type": "text", "text": "obj"}},
                {"role": "assistant", "content": "ok", "tool_calls": None},
            ]
        },
        [("assistant", "text", "messages[6].content", None)],
        id="empty-or-odd-content-contributes-nothing",
    ),
    pytest.param({"messages": {"role": "user", "content": "x"}}, [], id="messages-not-a-list"),
    pytest.param({"tools": {"type": "function"}}, [], id="tools-not-a-list"),
    pytest.param(
        '{"messages":[{"role":"user","content":"first"}],"messages":[{"role":"user","content":"last"}]}',
        [("user", "text", "messages[0].content", None)],
        id="duplicate-messages-last-read",
    ),
    pytest.param(
        '{"messages":[{"role":"user","content":"a","content":[{"type":"text","text":"b"}]}]}',
        [("user", "text", "messages[0].content[0]", None)],
        id="duplicate-content-last-read",
    ),
    pytest.param(
        '{"messages":[{"role":"user","role":"assistant","content":"a","tool_calls":[{"id":1}]}]}',
        [
            ("assistant", "text", "messages[0].content", None),
            ("tool_call", "", "messages[0].tool_calls[0]", None),
        ],
        id="duplicate-role-last-read",
    ),
]


@pytest.mark.parametrize(("body", "expected"), BLOCK_ORDER)
def test_block_order(body: dict[str, Any] | str, expected: list[Any]) -> None:
    assert _sites(body) == expected


def test_site_texts_and_bodies() -> None:
    body = {
        "tools": [{**TOOL, "cache_control": EPH}],
        "messages": [
            {"role": "system", "content": "static system"},
            {"role": "user", "content": [_text("doc", cache_control=H1), {"type": "image_url"}]},
            {"role": "assistant", "tool_calls": [{**CALL, "cache_control": EPH}]},
        ],
    }
    found, _ = _layout(codec.dumps(body).decode())
    tool_json = codec.canonical(TOOL)
    assert [(s.text, s.body) for s in found.sites] == [
        (tool_json.decode(), tool_json),
        ("static system", string_body("static system")),
        ("doc", object_body(_text("doc"))),
        ("", b'{"type":"image_url"}'),
        (codec.canonical(CALL).decode(), codec.canonical(CALL)),
    ]
    assert b"cache_control" in tool_json  # the schema property is content


STRIPS = [
    pytest.param(
        _blocks('{"type":"text","text":"a","cache_control":{"type":"ephemeral"}}'),
        _blocks('{"type":"text","text":"a"}'),
        id="last-member",
    ),
    pytest.param(
        _blocks('{"cache_control":null, "type":"text","text":"a"}'),
        _blocks('{"type":"text","text":"a"}'),
        id="first-member-null",
    ),
    pytest.param(
        _blocks('{"type":"text" ,\n "cache_control" : {} ,\t"text":"a"}'),
        _blocks('{"type":"text" ,\n "text":"a"}'),
        id="middle-member-white-space",
    ),
    pytest.param(
        _blocks('{"cache_control":{"type":"ephemeral"}}'),
        _blocks("{}"),
        id="only-member",
    ),
    pytest.param(
        _blocks('{"cache_control":1,"text":"a","cache_control":null}'),
        _blocks('{"text":"a"}'),
        id="duplicates-all-cut",
    ),
    pytest.param(
        _blocks('{"text":"a","cache\\u005fcontrol":{"type":"ephemeral"}}'),
        _blocks('{"text":"a"}'),
        id="escaped-name",
    ),
    pytest.param(
        '{"tools":[{"type":"function","function":{"parameters":{"properties":{"cache_control":{}}}},"cache_control":{"type":"ephemeral"}}]}',
        '{"tools":[{"type":"function","function":{"parameters":{"properties":{"cache_control":{}}}}}]}',
        id="tool-entry-schema-property-survives",
    ),
    pytest.param(
        '{"messages":[{"role":"assistant","tool_calls":[{"id":"c","cache_control":{"type":"ephemeral"}}]}]}',
        '{"messages":[{"role":"assistant","tool_calls":[{"id":"c"}]}]}',
        id="assistant-tool-call",
    ),
    pytest.param(
        '{"messages":[{"role":"user","tool_calls":[{"id":"c","cache_control":"not validated"}]}]}',
        '{"messages":[{"role":"user","tool_calls":[{"id":"c"}]}]}',
        id="other-role-tool-call-stripped-unvalidated",
    ),
    pytest.param(
        '{"messages":[{"role":"user","content":"a","cache_control":{"type":"ephemeral"}}]}',
        '{"messages":[{"role":"user","content":"a","cache_control":{"type":"ephemeral"}}]}',
        id="message-object-marker-is-content",
    ),
    pytest.param(
        _blocks('{"text":"a","meta":{"cache_control":1}}'),
        _blocks('{"text":"a","meta":{"cache_control":1}}'),
        id="nested-marker-is-content",
    ),
    pytest.param('{"cache_control":null,"model":"m"}', '{"model":"m"}', id="top-level-null-first"),
    pytest.param(
        '{"model":"m" , "cache_control":{"type":"ephemeral"} }',
        '{"model":"m" }',
        id="top-level-last",
    ),
    pytest.param(
        '{"messages":[{"role":"user","content":[{"text":"a","cache_control":{}}]}],'
        '"messages":[{"role":"user","content":"b"}]}',
        '{"messages":[{"role":"user","content":[{"text":"a"}]}],'
        '"messages":[{"role":"user","content":"b"}]}',
        id="unread-duplicate-messages-still-stripped",
    ),
    pytest.param(
        '{"tools":[{"cache_control":5}],"tools":[]}',
        '{"tools":[{}],"tools":[]}',
        id="unread-duplicate-tools-still-stripped",
    ),
    pytest.param(
        '{"messages":[{"role":"assistant","tool_calls":[{"cache_control":5}],"tool_calls":[]}]}',
        '{"messages":[{"role":"assistant","tool_calls":[{}],"tool_calls":[]}]}',
        id="unread-duplicate-tool-calls-still-stripped",
    ),
]


@pytest.mark.parametrize(("text", "forwarded"), STRIPS)
def test_markers_cut(text: str, forwarded: str) -> None:
    assert _layout(text)[1] == forwarded


def test_the_last_of_duplicate_markers_is_the_one_read() -> None:
    text = _blocks('{"cache_control":1,"cache_control":{"ttl":"1h"}}')
    found, _ = _layout(text)
    assert [s.marker for s in found.sites] == [{"ttl": "1h"}]


TOP_LEVEL = [
    pytest.param("{}", None, id="absent"),
    pytest.param('{"cache_control":null}', None, id="null"),
    pytest.param('{"cache_control":{"type":"ephemeral"}}', EPH, id="marker"),
    pytest.param('{"cache_control":{"type":"x"},"cache_control":null}', None, id="last-wins"),
    pytest.param('{"cache_control":"bad"}', "bad", id="malformed-read-as-is"),
]


@pytest.mark.parametrize(("text", "marker"), TOP_LEVEL)
def test_top_level_marker(text: str, marker: object) -> None:
    found, forwarded = _layout(text)
    assert found.top_marker == marker
    assert "cache_control" not in forwarded


def _system(*blocks: Any, role: str = "system") -> str:
    return codec.dumps({"messages": [{"role": role, "content": list(blocks)}]}).decode()


TELEMETRY = [
    pytest.param(
        _system(_text(BILLING), _text("rules")),
        DEFAULT,
        ["messages[0].content[0]"],
        ["messages[0].content[1]"],
        _system(_text("rules")),
        id="cut-first",
    ),
    pytest.param(
        _system(_text("rules"), _text(" \n\t" + BILLING)),
        DEFAULT,
        ["messages[0].content[1]"],
        ["messages[0].content[0]"],
        _system(_text("rules")),
        id="leading-white-space-trimmed",
    ),
    pytest.param(
        _system(_text(BILLING, cache_control=None)),
        DEFAULT,
        ["messages[0].content[0]"],
        [],
        '{"messages":[{"role":"system","content":[]}]}',
        id="null-marker-is-unmarked",
    ),
    pytest.param(
        _system(_text(BILLING), _text(BILLING)),
        KEEP_TELEMETRY,
        ["messages[0].content[0]", "messages[0].content[1]"],
        [],
        _system(_text(BILLING), _text(BILLING)),
        id="kept-when-told",
    ),
    pytest.param(
        _system(_text(BILLING, cache_control=EPH)),
        DEFAULT,
        [],
        ["messages[0].content[0]"],
        _system(_text(BILLING)),
        id="marked-block-is-content",
    ),
    pytest.param(
        _system(_text(BILLING), role="user"),
        DEFAULT,
        [],
        ["messages[0].content[0]"],
        _system(_text(BILLING), role="user"),
        id="user-role-is-content",
    ),
    pytest.param(
        codec.dumps({"messages": [{"role": "system", "content": BILLING}]}).decode(),
        DEFAULT,
        [],
        ["messages[0].content"],
        codec.dumps({"messages": [{"role": "system", "content": BILLING}]}).decode(),
        id="string-content-is-content",
    ),
    pytest.param(
        _system(_text("see " + BILLING), {"type": "text", "text": ["x-anthropic-billing-header:"]}),
        DEFAULT,
        [],
        ["messages[0].content[0]", "messages[0].content[1]"],
        _system(_text("see " + BILLING), {"type": "text", "text": ["x-anthropic-billing-header:"]}),
        id="prefix-not-at-start-or-not-a-string",
    ),
    pytest.param(
        _system(_text(BILLING.upper())),
        DEFAULT,
        [],
        ["messages[0].content[0]"],
        _system(_text(BILLING.upper())),
        id="prefix-is-case-sensitive",
    ),
    pytest.param(
        _system({"text": BILLING}),
        DEFAULT,
        ["messages[0].content[0]"],
        [],
        '{"messages":[{"role":"system","content":[]}]}',
        id="type-not-required",
    ),
    pytest.param(
        _system(_text("trace: 1"), _text(BILLING)),
        RequestPolicy(telemetry_prefixes=("trace:",)),
        ["messages[0].content[0]"],
        ["messages[0].content[1]"],
        _system(_text(BILLING)),
        id="configured-prefixes",
    ),
    pytest.param(
        _system(_text(BILLING)),
        RequestPolicy(telemetry_prefixes=()),
        [],
        ["messages[0].content[0]"],
        _system(_text(BILLING)),
        id="no-prefixes",
    ),
]


@pytest.mark.parametrize(("text", "policy", "telemetry", "sites", "forwarded"), TELEMETRY)
def test_telemetry_blocks(
    text: str, policy: RequestPolicy, telemetry: list[str], sites: list[str], forwarded: str
) -> None:
    found, out = _layout(text, policy)
    assert [t.where for t in found.telemetry] == telemetry
    assert [s.where for s in found.sites] == sites
    assert out == forwarded


def test_telemetry_records_its_text_length() -> None:
    found, _ = _layout(_system(_text("  " + BILLING)))
    assert found.telemetry == (Telemetry("messages[0].content[0]", len(BILLING) + 2),)


INCLUDE_USAGE = [
    pytest.param(
        '{"stream":true}', '{"stream":true,"stream_options":{"include_usage":true}}', id="added"
    ),
    pytest.param(
        '{"stream":true , "x":1 }',
        '{"stream":true , "x":1 ,"stream_options":{"include_usage":true}}',
        id="added-after-white-space",
    ),
    pytest.param(
        '{"stream":true,"stream_options":null}',
        '{"stream":true,"stream_options":{"include_usage":true}}',
        id="null-replaced",
    ),
    pytest.param(
        '{"stream":true,"stream_options":{ }}',
        '{"stream":true,"stream_options":{ "include_usage":true}}',
        id="empty-object",
    ),
    pytest.param(
        '{"stream":true,"stream_options":{"continuous_usage_stats":true }}',
        '{"stream":true,"stream_options":{"continuous_usage_stats":true ,"include_usage":true}}',
        id="other-options-kept",
    ),
    pytest.param(
        '{"stream":true,"stream_options":{"include_usage":false,"include_usage":1}}',
        '{"stream":true,"stream_options":{"include_usage":true,"include_usage":true}}',
        id="every-copy-forced",
    ),
    pytest.param(
        '{"stream":true,"stream_options":{"include_usage":true}}',
        '{"stream":true,"stream_options":{"include_usage":true}}',
        id="already-true",
    ),
    pytest.param(
        '{"stream":true,"stream_options":"usage"}',
        '{"stream":true,"stream_options":"usage"}',
        id="not-an-object-left-to-the-upstream",
    ),
    pytest.param(
        '{"stream":false,"stream":true}',
        '{"stream":false,"stream":true,"stream_options":{"include_usage":true}}',
        id="last-stream-wins",
    ),
    pytest.param(
        '{"stream":true,"cache_control":null}',
        '{"stream":true,"stream_options":{"include_usage":true}}',
        id="with-a-cut-at-the-end",
    ),
    pytest.param(
        '{"stream":false,"stream_options":{"include_usage":false}}',
        '{"stream":false,"stream_options":{"include_usage":false}}',
        id="not-streaming",
    ),
    pytest.param('{"stream":"true"}', '{"stream":"true"}', id="stream-string"),
    pytest.param('{"stream":1}', '{"stream":1}', id="stream-one"),
]


@pytest.mark.parametrize(("text", "forwarded"), INCLUDE_USAGE)
def test_include_usage_forced_on_streams(text: str, forwarded: str) -> None:
    assert _layout(text)[1] == forwarded
