"""``prepare``: read once, validate, hash and strip, forwarding every other byte as sent.

Tables spell forwarded bodies out byte for byte; the properties run generated bodies (tools,
tool calls, top-level markers, telemetry, hostile numbers, deep values, duplicate names) past
an oracle that works from the generated model alone (``tests.core.bodies``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from extproc.core import codec, spans
from extproc.core.errors import BodyReadError, MarkerError, RejectReason
from extproc.core.markers import CONFLICT_MESSAGE, NO_SLOT_MESSAGE
from extproc.core.model import RequestPolicy, Tier, TierPolicy
from extproc.core.prefix import Breakpoint, prefix_hashes, string_body
from extproc.core.request import Prepared, prepare
from tests.core import bodies

POLICY = RequestPolicy()
EPH: dict[str, Any] = {"type": "ephemeral"}
EPH_1H: dict[str, Any] = {"type": "ephemeral", "ttl": "1h"}
BILLING = "x-anthropic-billing-header: cc_version=2.1; cch=00000;"
R = RejectReason
VECTORS = (
    "3f64b6de25662606fce3fdbfc38c06d90282a10f28a6a12496225051481cf3e2",
    "b063c46136d7e666f8ff6dfbb59370f23dd93a60e692faceb73da98351330939",
)


def _prepare(raw: bytes, policy: RequestPolicy = POLICY, query: bool = False) -> Prepared:
    prepared = prepare(raw, policy, query)
    assert prepared is not None
    return prepared


def _body(*messages: Any, **fields: Any) -> bytes:
    return codec.dumps({"model": "m", "messages": list(messages), **fields})


def _user(*blocks: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def _text(text: str, marker: object = "absent") -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": text}
    if marker != "absent":
        block["cache_control"] = marker
    return block


# ---- forwarding ----

UNCHANGED = [
    pytest.param(_body({"role": "user", "content": "hi"}), id="plain"),
    pytest.param(_body(stream=False), id="stream-false"),
    pytest.param(_body(stream=True, stream_options={"include_usage": True}), id="usage-on"),
    pytest.param(b'{ "model" : "m",\n  "messages": [] }\n', id="odd-white-space"),
    pytest.param(b'{"messages":[{"role":"user","content":"\\u00e9\\/"}]}', id="escapes"),
    pytest.param(b"{}", id="empty-object"),
    pytest.param(b'{"messages": "text"}', id="messages-not-a-list"),
    pytest.param(b'{"messages": [1, "x", null]}', id="non-object-messages"),
    pytest.param(
        b'{"messages":[{"role":"user","content":"a","cache_control":{"type":"ephemeral"}}]}',
        id="message-object-marker-is-content",
    ),
    pytest.param(
        b'{"tools":[{"function":{"parameters":{"cache_control":{"type":"x"}}}}],"messages":[]}',
        id="schema-property-is-content",
    ),
    pytest.param(
        b'{"messages":[{"role":"system","content":[{"type":"text","text":"'
        + BILLING.encode()
        + b'"}]}]}',
        id="telemetry-with-nothing-to-change-when-kept",
    ),
]


@pytest.mark.parametrize("raw", UNCHANGED)
def test_a_body_with_nothing_to_change_is_the_same_bytes(raw: bytes) -> None:
    prepared = _prepare(raw, RequestPolicy(strip_telemetry=False))
    assert prepared.body is raw
    assert not prepared.changed
    assert not prepared.had_markers


CHANGED = [
    pytest.param(
        b'{"messages":[{"role":"user","content":[{"type":"text","text":"a",'
        b'"cache_control":{"type":"ephemeral"}}]}]}',
        b'{"messages":[{"role":"user","content":[{"type":"text","text":"a"}]}]}',
        True,
        id="marker",
    ),
    pytest.param(
        b'{"messages":[{"role":"user","content":[{"type":"text","text":"a",'
        b'"cache_control":null}]}]}',
        b'{"messages":[{"role":"user","content":[{"type":"text","text":"a"}]}]}',
        False,
        id="null-marker-is-stripped-but-no-marker",
    ),
    pytest.param(
        b'{"stream":true,"stream_options":{"x":1}}',
        b'{"stream":true,"stream_options":{"x":1,"include_usage":true}}',
        False,
        id="stream-usage-forced",
    ),
    pytest.param(
        b'{"cache_control":null,"messages":[]}', b'{"messages":[]}', False, id="top-level-null"
    ),
    pytest.param(
        b'{"messages":[],"cache_control":{"type":"ephemeral"}}',
        b'{"messages":[]}',
        True,
        id="top-level-marker-without-blocks",
    ),
    pytest.param(
        b'{"messages":[{"role":"user","tool_calls":[{"cache_control":{"type":"ephemeral"}}]}]}',
        b'{"messages":[{"role":"user","tool_calls":[{}]}]}',
        False,
        id="other-role-tool-call-marker-stripped-not-counted",
    ),
    pytest.param(
        b'{"messages":[{"role":"system","content":[{"type":"text","text":"'
        + BILLING.encode()
        + b'"},{"type":"text","text":"s"}]}]}',
        b'{"messages":[{"role":"system","content":[{"type":"text","text":"s"}]}]}',
        False,
        id="telemetry-cut",
    ),
]


@pytest.mark.parametrize(("raw", "forwarded", "had_markers"), CHANGED)
def test_changed_body_is_spliced(raw: bytes, forwarded: bytes, had_markers: bool) -> None:
    prepared = _prepare(raw)
    assert prepared.body == forwarded
    assert prepared.changed
    assert prepared.had_markers is had_markers


MARK = ',"cache_control":{"type":"ephemeral"}'
DEEP = "[" * 3000 + '{"cache_control":null}' + "]" * 3000
FIDELITY = [
    pytest.param('"n":1180591620717411303424', id="int-beyond-64-bits"),
    pytest.param('"n":-1180591620717411303424', id="negative-int-beyond-64-bits"),
    pytest.param('"n":' + "7" * 5000, id="int-beyond-the-conversion-limit"),
    pytest.param('"n":1e400,"m":-1e400', id="beyond-a-double"),
    pytest.param('"n":NaN,"m":Infinity,"o":-Infinity', id="constants"),
    pytest.param('"n":0.1000000000000000055511151231257827,"m":1.5e-400,"o":-0', id="precision"),
    pytest.param('"s":"\\ud800","t":"\\udfff\\ud83d"', id="escaped-lone-surrogates"),
    pytest.param('"s":"\\u00e9\\/\\"","t":"\\u0000"', id="escapes-as-written"),
    pytest.param('"d":1,"d":2,"d":{"x":1}', id="duplicate-keys"),
    pytest.param('"deep":' + DEEP, id="nesting-3000"),
    pytest.param('"s":"\udcff\udcfe\udcc3"', id="invalid-utf8-in-a-string"),
    pytest.param('"s" \t:\r\n "x",\n\t"t"\r:[ 1 ,\t2 ]', id="odd-white-space"),
]


def _fidelity(extra: str, marker: str) -> str:
    """A body with ``extra`` in a marked block, inside the block's message and at the top."""
    block = '{"type":"text","text":"a",' + extra + marker + "}"
    message = '{"role":"user",' + extra + ',"content":[' + block + "]}"
    return '\ufeff {"model":"m",' + extra + ',"messages":[' + message + "]" + marker + "}\n"


@pytest.mark.parametrize("extra", FIDELITY)
def test_every_untouched_value_is_forwarded_byte_for_byte(extra: str) -> None:
    raw = spans.encode(_fidelity(extra, MARK))
    prepared = _prepare(raw)
    assert prepared.body == spans.encode(_fidelity(extra, ""))
    assert prepared.breakpoints == (Breakpoint(0, Tier.M5),)
    assert len(prepared.blocks) == 1


def test_nesting_inside_a_tool_and_a_tool_call_is_forwarded() -> None:
    deep = '{"x":' + DEEP + "}"
    raw = (
        '{"tools":[{"type":"function","p":' + deep + MARK + "}],"
        '"messages":[{"role":"assistant","tool_calls":[{"id":1,"p":' + deep + MARK + "}]}]}"
    )
    prepared = _prepare(raw.encode())
    assert prepared.body == raw.replace(MARK, "").encode()
    assert [b.role for b in prepared.blocks] == ["tool_definition", "tool_call"]
    assert [b.text for b in prepared.blocks] == [
        '{"p":' + deep + ',"type":"function"}',
        '{"id":1,"p":' + deep + "}",
    ]


def test_stream_and_telemetry_edits_leave_everything_else() -> None:
    raw = (
        '{"stream":true,"n":1e400,"messages":[{"role":"system","content":[\n'
        '  {"type":"text","text":"' + BILLING + '","cache_control":null},\n'
        '  {"type":"text","text":"rules","x":NaN' + MARK + "}]}]}"
    )
    forwarded = (
        '{"stream":true,"n":1e400,"messages":[{"role":"system","content":[\n'
        '  {"type":"text","text":"rules","x":NaN}]}],"stream_options":{"include_usage":true}}'
    )
    assert _prepare(raw.encode()).body == forwarded.encode()


UNREADABLE_MARKED = [
    pytest.param(b'{"cache_control":{"type":"ephemeral"},}', id="trailing-comma"),
    pytest.param(b"{'cache_control': 1}", id="single-quotes"),
    pytest.param(b'{"messages":[{"content":[{"cache_control":{}}]}]', id="truncated"),
    pytest.param(b'{"a":"\\u0063ache_control",}', id="escaped-letter"),
    pytest.param(b'{"cache\\u005Fcontrol":1,}', id="escaped-underscore-uppercase-hex"),
    pytest.param(b'{"x":1}{"cache_control":null}', id="two-values"),
    pytest.param(b'// cache_control\n{"a":1}', id="comment"),
    pytest.param(b'{"a":1, cache_control: 1}', id="unquoted-name"),
    pytest.param(
        '{"messages":[{"content":[{"cache_control":{"type":"ephemeral"}}]}]}'.encode("utf-16"),
        id="utf-16-with-bom",
    ),
    pytest.param('{"cache_control":1}'.encode("utf-16-le"), id="utf-16-le"),
    pytest.param('{"cache_control":1}'.encode("utf-32-be"), id="utf-32-be"),
    pytest.param('{"a":{"cache\\u005fcontrol":1}}'.encode("utf-16-le"), id="utf-16-escaped"),
    pytest.param('{"cache_control":1}'.encode("utf-16-le") + b"\x00", id="utf-16-stray-byte"),
    pytest.param(b'{"a":1}\xff"cache_control"', id="invalid-utf8-outside-strings"),
    pytest.param(b'\xef\xbb\xbf\xef\xbb\xbf{"cache_control":1}', id="two-boms"),
]


@pytest.mark.parametrize("raw", UNREADABLE_MARKED)
def test_an_unreadable_body_that_may_carry_a_marker_is_refused(raw: bytes) -> None:
    with pytest.raises(BodyReadError) as caught:
        prepare(raw, POLICY)
    err = caught.value
    assert err.reason is R.UNREADABLE_BODY
    assert (err.code, err.param) == ("unreadable_body", None)
    assert err.message == (
        "request body is not valid JSON; cache_control markers can only be read in a valid "
        "UTF-8 JSON body"
    )


NOT_FORWARDABLE_AS_OBJECT = [
    pytest.param(b"", id="empty"),
    pytest.param(b"{", id="truncated"),
    pytest.param(b"not json", id="text"),
    pytest.param(b'{"a":1} x', id="trailing-garbage"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
    pytest.param('{"a":1,}'.encode("utf-16"), id="utf-16-without-marker"),
    pytest.param(b'{"control":"cache"}{', id="words-apart"),
    pytest.param(b"[]", id="array"),
    pytest.param(b'["cache_control"]', id="readable-array-mentioning-a-marker"),
    pytest.param(b'"s"', id="string"),
    pytest.param(b"1", id="number"),
    pytest.param(b"null", id="null"),
]


@pytest.mark.parametrize("raw", NOT_FORWARDABLE_AS_OBJECT)
def test_anything_but_an_object_is_none(raw: bytes) -> None:
    assert prepare(raw, POLICY) is None


FIELDS = [
    pytest.param({"model": "qwen", "stream": True}, "qwen", True, id="model-and-stream"),
    pytest.param({"model": 5, "stream": "yes"}, None, False, id="wrong-types"),
    pytest.param({"stream": 1}, None, False, id="missing-model"),
]


@pytest.mark.parametrize(("body", "model", "stream"), FIELDS)
def test_model_and_stream(body: dict[str, Any], model: str | None, stream: bool) -> None:
    prepared = _prepare(codec.dumps(body))
    assert (prepared.model, prepared.stream) == (model, stream)


def test_literal_model_is_not_a_model() -> None:
    assert _prepare(b'{"model":NaN,"stream":true}').model is None


# ---- blocks, hashes, breakpoints ----


def test_design_vectors() -> None:
    prepared = _prepare(
        _body({"role": "system", "content": "static system"}, {"role": "user", "content": "hi"})
    )
    assert [h.hex() for h in prepared.hashes] == list(VECTORS)
    assert [b.body for b in prepared.blocks] == [string_body("static system"), string_body("hi")]


def test_design_vectors_with_array_content_markers_and_telemetry() -> None:
    system = {"role": "system", "content": [_text(BILLING), _text("static system", EPH_1H)]}
    user = _user(_text("hi", None))
    prepared = _prepare(_body(system, user))
    assert [h.hex() for h in prepared.hashes] == list(VECTORS)
    assert prepared.breakpoints == (Breakpoint(0, Tier.H1),)
    assert [t.where for t in prepared.telemetry] == ["messages[0].content[0]"]


def test_every_kind_of_block_in_order_with_hashes_of_their_bodies() -> None:
    tool = {"type": "function", "function": {"name": "f"}, "cache_control": EPH}
    call = {"id": "c", "type": "function", "cache_control": EPH_1H}
    raw = _body(
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": [_text("a")], "tool_calls": [call]},
        _user(_text("q", {"type": "ephemeral", "ttl": "24h"})),
        tools=[tool],
    )
    prepared = _prepare(raw)
    assert [(b.role, b.kind, b.where, b.tier) for b in prepared.blocks] == [
        ("tool_definition", "function", "tools[0]", Tier.M5),
        ("system", "text", "messages[0].content", None),
        ("assistant", "text", "messages[1].content[0]", None),
        ("tool_call", "function", "messages[1].tool_calls[0]", Tier.H1),
        ("user", "text", "messages[2].content[0]", Tier.H24),
    ]
    assert prepared.blocks[0].text == '{"function":{"name":"f"},"type":"function"}'
    assert prepared.blocks[3].text == '{"id":"c","type":"function"}'
    assert prepared.breakpoints == (
        Breakpoint(0, Tier.M5),
        Breakpoint(3, Tier.H1),
        Breakpoint(4, Tier.H24),
    )
    assert prepared.hashes == prefix_hashes(prepared.blocks)
    assert prepared.had_markers
    assert b"cache_control" not in prepared.body


MARKER_VARIANTS = [
    pytest.param("absent", id="no-marker"),
    pytest.param(None, id="null-marker"),
    pytest.param(EPH, id="default-marker"),
    pytest.param(EPH_1H, id="1h-marker"),
    pytest.param({"type": "ephemeral", "ttl": "24h"}, id="24h-marker"),
]


@pytest.mark.parametrize("marker", MARKER_VARIANTS)
def test_markers_never_change_a_hash(marker: object) -> None:
    def body(mark: object) -> bytes:
        tool = {"type": "function", **({} if mark == "absent" else {"cache_control": mark})}
        call = {"id": "c", **({} if mark == "absent" else {"cache_control": mark})}
        assistant = {"role": "assistant", "content": [_text("b", mark)], "tool_calls": [call]}
        return _body(_user(_text("a", mark)), assistant, tools=[tool])

    assert _prepare(body(marker)).hashes == _prepare(body("absent")).hashes


@pytest.mark.parametrize("keep", [pytest.param(True, id="kept"), pytest.param(False, id="cut")])
def test_telemetry_never_changes_a_hash(keep: bool) -> None:
    policy = RequestPolicy(strip_telemetry=not keep)
    with_it = _body({"role": "system", "content": [_text(BILLING), _text("s")]}, _user(_text("u")))
    without = _body({"role": "system", "content": [_text("s")]}, _user(_text("u")))
    prepared = _prepare(with_it, policy)
    assert prepared.hashes == _prepare(without, policy).hashes
    assert [b.text for b in prepared.blocks] == ["s", "u"]
    assert (BILLING.encode() in prepared.body) is keep


def test_telemetry_is_never_a_breakpoint() -> None:
    raw = _body({"role": "system", "content": [_text(BILLING)]}, cache_control=EPH)
    prepared = _prepare(raw)
    assert (prepared.blocks, prepared.breakpoints) == ((), ())


# ---- validation ----


def _marked(n: int, marker: object = EPH) -> list[dict[str, Any]]:
    return [_text(str(i), marker) for i in range(n)]


TOOLS_2 = [{"type": "function", "cache_control": EPH}] * 2
REJECTED = [
    pytest.param(
        _body(_user(_text("a", {"type": "x"}))),
        R.UNSUPPORTED_TYPE,
        'unsupported cache_control type: "x" (only "ephemeral")',
        id="unsupported-type",
    ),
    pytest.param(
        b'{"messages":[{"role":"user","content":[{"cache_control":{"type":NaN}}]}]}',
        R.MALFORMED,
        'cache_control must be an object with a string "type": "ephemeral" '
        '(and an optional string "ttl")',
        id="literal-type-is-malformed",
    ),
    pytest.param(
        _body(_user(_text("a", {"type": "ephemeral", "ttl": "2h"}), _text("b", 5))),
        R.INVALID_TTL,
        'invalid cache_control ttl: "2h"',
        id="first-invalid-in-block-order",
    ),
    pytest.param(
        _body(_user(*_marked(5))),
        R.TOO_MANY_BREAKPOINTS,
        "too many cache_control breakpoints (max 4)",
        id="five",
    ),
    pytest.param(
        _body(_user(*_marked(3)), tools=TOOLS_2),
        R.TOO_MANY_BREAKPOINTS,
        "too many cache_control breakpoints (max 4)",
        id="tool-markers-count",
    ),
    pytest.param(
        _body(
            _user(*_marked(2)),
            {"role": "assistant", "tool_calls": [{"cache_control": EPH}] * 3},
        ),
        R.TOO_MANY_BREAKPOINTS,
        "too many cache_control breakpoints (max 4)",
        id="tool-call-markers-count",
    ),
    pytest.param(
        _body({"role": "assistant", "tool_calls": [{"cache_control": "bad"}]}),
        R.MALFORMED,
        'cache_control must be an object with a string "type": "ephemeral" '
        '(and an optional string "ttl")',
        id="assistant-tool-call-marker-validated",
    ),
    pytest.param(
        _body(
            {"role": "user", "content": "x"},
            tools=[{"cache_control": {"type": "ephemeral", "ttl": "7d"}}],
        ),
        R.INVALID_TTL,
        'invalid cache_control ttl: "7d"',
        id="tool-marker-validated",
    ),
    pytest.param(
        _body(_user(*_marked(5)), cache_control={"type": "bogus"}),
        R.TOO_MANY_BREAKPOINTS,
        "too many cache_control breakpoints (max 4)",
        id="count-before-top-level",
    ),
    pytest.param(
        _body(_user(_text("a")), cache_control="yes"),
        R.MALFORMED,
        'cache_control must be an object with a string "type": "ephemeral" '
        '(and an optional string "ttl")',
        id="top-level-validated",
    ),
    pytest.param(
        _body(cache_control={"type": "ephemeral", "ttl": "2h"}),
        R.INVALID_TTL,
        'invalid cache_control ttl: "2h"',
        id="top-level-validated-without-blocks",
    ),
    pytest.param(
        _body(_user(_text("a", EPH)), cache_control=EPH_1H),
        R.AUTOMATIC_TTL_CONFLICT,
        CONFLICT_MESSAGE,
        id="other-tier-on-the-last-block",
    ),
    pytest.param(
        _body(_user(*_marked(4), _text("tail")), cache_control=EPH),
        R.AUTOMATIC_NO_SLOT,
        NO_SLOT_MESSAGE,
        id="four-explicit-and-top-level",
    ),
]


@pytest.mark.parametrize(("raw", "reason", "message"), REJECTED)
def test_invalid_markers_raise(raw: bytes, reason: R, message: str) -> None:
    with pytest.raises(MarkerError) as caught:
        prepare(raw, POLICY)
    assert caught.value.reason is reason
    assert caught.value.message == message
    assert (caught.value.code, caught.value.param) == ("invalid_cache_control", "cache_control")


NOT_VALIDATED = [
    pytest.param(
        _body({"role": "user", "content": "x", "tool_calls": [{"cache_control": "bad"}] * 6}),
        id="other-role-tool-calls",
    ),
    pytest.param(_body({"role": "user", "content": "x", "cache_control": "bad"}), id="message"),
    pytest.param(_body(_user(_text("a") | {"meta": {"cache_control": 5}})), id="nested"),
    pytest.param(
        _body(tools=[{"function": {"parameters": {"cache_control": "bad"}}}]), id="in-a-schema"
    ),
    pytest.param(
        b'{"messages":[{"role":"user","content":[{"cache_control":"bad"}]}],'
        b'"messages":[{"role":"user","content":"x"}]}',
        id="unread-duplicate-stripped-unvalidated",
    ),
]


@pytest.mark.parametrize("raw", NOT_VALIDATED)
def test_markers_elsewhere_are_not_validated(raw: bytes) -> None:
    prepared = _prepare(raw)
    assert prepared.breakpoints == ()
    assert not prepared.had_markers


# ---- automatic caching ----

ONLY_5M = RequestPolicy(TierPolicy(frozenset({Tier.M5})))
AUTOMATIC = [
    pytest.param(
        _body(_user(_text("a"), _text("b"))),
        EPH,
        False,
        POLICY,
        [(1, Tier.M5, True)],
        id="last-block",
    ),
    pytest.param(
        _body(_user(_text("a"))), EPH_1H, False, POLICY, [(0, Tier.H1, True)], id="top-level-tier"
    ),
    pytest.param(
        _body(_user(_text("a", EPH_1H))),
        EPH_1H,
        False,
        POLICY,
        [(0, Tier.H1, False)],
        id="same-tier-on-the-last-block-is-a-no-op",
    ),
    pytest.param(
        _body(_user(_text("a", EPH), _text("b"))),
        EPH_1H,
        False,
        POLICY,
        [(0, Tier.M5, False), (1, Tier.H1, True)],
        id="after-an-explicit-marker",
    ),
    pytest.param(
        _body(_user(*_marked(3), _text("t"))),
        EPH,
        False,
        POLICY,
        [(0, Tier.M5, False), (1, Tier.M5, False), (2, Tier.M5, False), (3, Tier.M5, True)],
        id="the-fourth-slot",
    ),
    pytest.param(
        _body(_user(*_marked(4))),
        EPH,
        False,
        POLICY,
        [(i, Tier.M5, False) for i in range(4)],
        id="four-explicit-last-same-tier",
    ),
    pytest.param(_body(), EPH, False, POLICY, [], id="no-blocks-nothing"),
    pytest.param(
        _body(tools=[{"type": "function"}]),
        EPH,
        False,
        POLICY,
        [(0, Tier.M5, True)],
        id="a-tool-is-the-last-block",
    ),
    pytest.param(
        _body({"role": "assistant", "content": "a", "tool_calls": [{"id": "c"}]}),
        EPH,
        False,
        POLICY,
        [(1, Tier.M5, True)],
        id="a-tool-call-is-the-last-block",
    ),
    pytest.param(_body(_user(_text("a"))), None, False, POLICY, [], id="null-top-level"),
    pytest.param(
        _body(_user(_text("a"))), "absent", True, POLICY, [(0, Tier.H1, True)], id="query-is-1h"
    ),
    pytest.param(
        _body(_user(_text("a"))),
        None,
        True,
        POLICY,
        [(0, Tier.H1, True)],
        id="query-with-null-top-level",
    ),
    pytest.param(
        _body(_user(_text("a"))), EPH, True, POLICY, [(0, Tier.M5, True)], id="body-wins-over-query"
    ),
    pytest.param(
        _body(_user(_text("a"))),
        EPH,
        True,
        ONLY_5M,
        [(0, Tier.M5, True)],
        id="body-wins-so-1h-need-not-be-enabled",
    ),
    pytest.param(
        _body(_user(_text("a", EPH_1H))),
        "absent",
        True,
        POLICY,
        [(0, Tier.H1, False)],
        id="query-same-tier-no-op",
    ),
]


@pytest.mark.parametrize(("raw", "top", "query", "policy", "expected"), AUTOMATIC)
def test_automatic_caching(
    raw: bytes, top: object, query: bool, policy: RequestPolicy, expected: list[Any]
) -> None:
    doc = codec.loads(raw)
    if top != "absent":
        doc["cache_control"] = top
    prepared = _prepare(codec.dumps(doc), policy, query)
    assert [(b.block, b.tier, b.automatic) for b in prepared.breakpoints] == expected
    assert b"cache_control" not in prepared.body
    assert prepared.had_markers is (top not in (None, "absent") or query)


AUTOMATIC_REJECTED = [
    pytest.param(
        _body(_user(_text("a"))),
        "absent",
        True,
        ONLY_5M,
        R.TIER_DISABLED,
        "cache_control ttl tier '1h' is not currently available; available tiers: 5m",
        id="query-needs-1h",
    ),
    pytest.param(
        _body(),
        "absent",
        True,
        ONLY_5M,
        R.TIER_DISABLED,
        "cache_control ttl tier '1h' is not currently available; available tiers: 5m",
        id="query-needs-1h-without-blocks",
    ),
    pytest.param(
        _body(_user(_text("a"))),
        None,
        True,
        ONLY_5M,
        R.TIER_DISABLED,
        "cache_control ttl tier '1h' is not currently available; available tiers: 5m",
        id="null-top-level-does-not-win",
    ),
    pytest.param(
        _body(_user(_text("a", EPH))),
        "absent",
        True,
        POLICY,
        R.AUTOMATIC_TTL_CONFLICT,
        CONFLICT_MESSAGE,
        id="query-conflict",
    ),
    pytest.param(
        _body(_user(*_marked(4), _text("t"))),
        "absent",
        True,
        POLICY,
        R.AUTOMATIC_NO_SLOT,
        NO_SLOT_MESSAGE,
        id="query-no-slot",
    ),
    pytest.param(
        _body(_user(_text("a"))),
        EPH_1H,
        False,
        ONLY_5M,
        R.TIER_DISABLED,
        "cache_control ttl tier '1h' is not currently available; available tiers: 5m",
        id="top-level-tier-disabled",
    ),
]


@pytest.mark.parametrize(("raw", "top", "query", "policy", "reason", "message"), AUTOMATIC_REJECTED)
def test_automatic_caching_rejected(
    raw: bytes, top: object, query: bool, policy: RequestPolicy, reason: R, message: str
) -> None:
    doc = codec.loads(raw)
    if top != "absent":
        doc["cache_control"] = top
    with pytest.raises(MarkerError) as caught:
        prepare(codec.dumps(doc), policy, query)
    assert caught.value.reason is reason
    assert caught.value.message == message


def test_default_tier_comes_from_the_policy() -> None:
    policy = RequestPolicy(TierPolicy(enabled=frozenset({Tier.H1}), default=Tier.H1))
    prepared = _prepare(_body(_user(_text("a", EPH))), policy)
    assert prepared.breakpoints == (Breakpoint(0, Tier.H1),)


# ---- properties ----

cases = st.tuples(bodies.chat_bodies(), bodies.gaps, st.booleans(), bodies.policies, st.booleans())
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _accepted(case: tuple[Any, ...]) -> tuple[bytes, Prepared, bodies.Expected]:
    body, gaps, bom, policy, query = case
    expected = bodies.expect(body, policy, query)
    raw = bodies.encode(body, gaps, bom)
    if expected.rejection is not None:
        with pytest.raises(MarkerError) as caught:
            prepare(raw, policy, query)
        assert caught.value.reason is expected.rejection
    assume(expected.rejection is None)
    return raw, _prepare(raw, policy, query), expected


def _is_subsequence(short: str, long: str) -> bool:
    rest = iter(long)
    return all(char in rest for char in short)


@PROPERTY
@given(cases)
def test_no_marker_is_ever_forwarded(case: tuple[Any, ...]) -> None:
    _, prepared, expected = _accepted(case)
    forwarded = bodies.read_back(prepared.body)
    for location in bodies.marker_locations(forwarded):
        assert all(name != bodies.MARKER for name, _ in location)
    content = bodies.count_markers(
        bodies.read_back(spans.encode(bodies.render(expected.forwarded)))
    )
    assert bodies.count_markers(forwarded) == content  # those left are content


@PROPERTY
@given(cases)
def test_every_untouched_value_is_forwarded_as_sent(case: tuple[Any, ...]) -> None:
    raw, prepared, expected = _accepted(case)
    body, _, bom, _, _ = case
    forwarded = spans.decode(prepared.body)
    assert forwarded.startswith("\ufeff") is bom
    assert bodies.squeeze(forwarded) == bodies.squeeze(
        "\ufeff" * bom + bodies.render(expected.forwarded)
    )
    if body.last("stream") != bodies.TRUE:
        assert _is_subsequence(forwarded, spans.decode(raw))  # only cuts, white space kept
    assert [(b.role, b.where, b.tier) for b in prepared.blocks] == expected.blocks
    assert [t.where for t in prepared.telemetry] == expected.telemetry
    assert [(b.block, b.tier, b.automatic) for b in prepared.breakpoints] == expected.breakpoints
    assert (prepared.body is raw) is not prepared.changed


def _content(prepared: Prepared, leave_out: Sequence[str] = ()) -> list[tuple[Any, ...]]:
    return [(b.role, b.kind, b.text, b.body) for b in prepared.blocks if b.where not in leave_out]


@PROPERTY
@given(cases)
def test_prepare_is_idempotent(case: tuple[Any, ...]) -> None:
    _, prepared, expected = _accepted(case)
    policy = case[3]
    again = _prepare(prepared.body, policy)
    assert not again.had_markers
    assert again.breakpoints == ()
    # A marked block that looks like telemetry is content; without its marker it is not.
    assert _content(again) == _content(prepared, expected.lookalikes)
    kept = 0 if policy.strip_telemetry else len(prepared.telemetry)
    assert len(again.telemetry) == kept + len(expected.lookalikes)
    if not expected.lookalikes:
        assert again.body is prepared.body
        assert not again.changed
        assert again.hashes == prepared.hashes
    third = _prepare(again.body, policy)
    assert third.body is again.body
    assert third.hashes == again.hashes


@PROPERTY
@given(cases)
def test_splicing_keeps_valid_json(case: tuple[Any, ...]) -> None:
    _, prepared, _ = _accepted(case)
    bodies.read_back(prepared.body)  # the standard library accepts it
    root = spans.read(spans.decode(prepared.body), spans.SHALLOW)
    assert isinstance(root.value, dict)
    assert prepared.hashes == prefix_hashes(prepared.blocks)
