"""The JSON module: lossless reading, the deep reader, ``Literal`` and the canonical form.

The standard library's ``json`` is the independent reference here: ``read_value`` must agree
with it wherever it can represent a value, and keep what it would lose everywhere else.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.core import codec
from extproc.core.codec import Literal

L = Literal
BIG = "1180591620717411303424"  # 2**70: beyond 64 bits
HUGE = "9" * 4100  # beyond the integer-conversion limit

READ_VALID = [
    pytest.param("0", 0, id="zero"),
    pytest.param("-0", 0, id="minus-zero"),
    pytest.param("18446744073709551615", 2**64 - 1, id="u64-max"),
    pytest.param("-9223372036854775809", -(2**63) - 1, id="below-i64"),
    pytest.param(BIG, 2**70, id="beyond-64-bits-stays-an-int"),
    pytest.param(HUGE, L(HUGE), id="beyond-conversion-limit-is-literal"),
    pytest.param("1.5", 1.5, id="float"),
    pytest.param("1E2", 100.0, id="exponent-is-a-float"),
    pytest.param("1.5e-400", 0.0, id="underflow-is-zero"),
    pytest.param("1e400", L("1e400"), id="overflow-literal"),
    pytest.param("-1e400", L("-1e400"), id="negative-overflow-literal"),
    pytest.param("1E+400", L("1E+400"), id="overflow-spelling-kept"),
    pytest.param("NaN", L("NaN"), id="nan"),
    pytest.param("Infinity", L("Infinity"), id="infinity"),
    pytest.param("-Infinity", L("-Infinity"), id="minus-infinity"),
    pytest.param("true", True, id="true"),
    pytest.param("null", None, id="null"),
    pytest.param(r'"\ud800"', "\ud800", id="escaped-lone-surrogate"),
    pytest.param(r'"\udfff\ud800"', "\udfff\ud800", id="reversed-surrogates"),
    pytest.param(r'"\ud83d\ude00"', "\U0001f600", id="surrogate-pair"),
    pytest.param(r'"\u00e9\/\"\\\t"', 'é/"\\\t', id="escapes"),
    pytest.param('"\udcff"', "\udcff", id="invalid-utf8-byte-as-decoded"),
    pytest.param('{"a":1,"a":2}', {"a": 2}, id="duplicate-keys-last-wins"),
    pytest.param('{ "a" : [ 1 , {} , [ ] ] }', {"a": [1, {}, []]}, id="white-space"),
    pytest.param(f"[NaN,1e400,{BIG}]", [L("NaN"), L("1e400"), 2**70], id="hostile-array"),
]


@pytest.mark.parametrize(("text", "expected"), READ_VALID)
def test_read_value(text: str, expected: Any) -> None:
    value, end = codec.read_value(text, 0)
    assert value == expected
    assert type(value) is type(expected)
    assert end == len(text)


@pytest.mark.parametrize(("text", "expected"), READ_VALID)
def test_deep_reader_agrees_on_the_table(text: str, expected: Any) -> None:
    assert codec._read_deep(text, 0) == (expected, len(text))


def test_read_value_starts_at_an_offset_and_stops_after_the_value() -> None:
    text = 'x: [1, "a"] , rest'
    assert codec.read_value(text, 3) == ([1, "a"], 11)
    assert codec._read_deep(text, 3) == ([1, "a"], 11)


READ_REJECTED = [
    pytest.param("", id="empty"),
    pytest.param("[1,]", id="trailing-comma-array"),
    pytest.param('{"a":1,}', id="trailing-comma-object"),
    pytest.param("{a:1}", id="unquoted-name"),
    pytest.param("'a'", id="single-quotes"),
    pytest.param('"a\x01"', id="control-character"),
    pytest.param('"abc', id="unterminated-string"),
    pytest.param("[1 2]", id="missing-comma"),
    pytest.param('{"a" 1}', id="missing-colon"),
    pytest.param("nan", id="lowercase-nan"),
    pytest.param("-NaN", id="minus-nan"),
    pytest.param("+1", id="plus-sign"),
    pytest.param(".5", id="leading-dot"),
    pytest.param("tru", id="truncated-word"),
    pytest.param("[", id="unterminated-array"),
]


@pytest.mark.parametrize("text", READ_REJECTED)
def test_read_value_rejects(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the contract is ValueError
        codec.read_value(text, 0)
    with pytest.raises(ValueError):  # noqa: PT011
        codec._read_deep(text, 0)


def test_read_value_wants_no_leading_white_space() -> None:
    with pytest.raises(ValueError, match="Expecting value"):
        codec.read_value(" 1", 0)


def _deep(kind: str, depth: int) -> tuple[str, Any]:
    """A value nested ``depth`` levels, and the same value built without recursion."""
    value: Any = 1
    if kind == "array":
        for _ in range(depth):
            value = [value]
        return "[" * depth + "1" + "]" * depth, value
    if kind == "object":
        for _ in range(depth):
            value = {"k": value}
        return '{"k":' * depth + "1" + "}" * depth, value
    for _ in range(depth // 2):
        value = [{"k": value, "n": NaN_}]
    return '[{"k":' * (depth // 2) + "1" + ',"n":NaN}]' * (depth // 2), value


NaN_ = L("NaN")
DEEP = [
    pytest.param("array", 5000, id="arrays-5000"),
    pytest.param("object", 5000, id="objects-5000"),
    pytest.param("mixed", 5000, id="mixed-5000"),
]


@pytest.mark.parametrize(("kind", "depth"), DEEP)
def test_deep_values_are_read_and_written_back(kind: str, depth: int) -> None:
    text, expected = _deep(kind, depth)
    with pytest.raises(RecursionError):
        json.loads(text)  # what the stack allows the standard library
    value, end = codec.read_value(text, 0)
    assert end == len(text)
    assert codec.canonical(value) == codec.canonical(expected) == text.encode()
    assert codec.dumps_value(value) == text


def test_deep_value_with_an_error_at_the_bottom_is_rejected() -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        codec.read_value("[" * 5000 + "1,]" + "]" * 4999, 0)


# ---- Literal ----


def test_literal_is_not_a_string() -> None:
    value, _ = codec.read_value('{"type":NaN,"ttl":1e400}', 0)
    assert not isinstance(value["type"], str)
    assert not isinstance(value["ttl"], str)
    assert value == {"type": L("NaN"), "ttl": L("1e400")}
    assert L("NaN") != "NaN"
    assert len({L("1e400"), L("1e400"), L("NaN")}) == 2
    assert repr(L("1e400")) == "Literal('1e400')"


LITERALS = ["1e400", "-1e400", "1E+400", "NaN", "Infinity", "-Infinity", HUGE]


@pytest.mark.parametrize("text", [pytest.param(t, id=t[:12]) for t in LITERALS])
def test_literal_round_trip(text: str) -> None:
    value, _ = codec.read_value(text, 0)
    assert value == L(text)
    assert codec.canonical(value) == text.encode()
    assert codec.dumps_value(value) == text
    assert codec.canonical({"v": value}) == b'{"v":' + text.encode() + b"}"
    assert codec.canonical({"v": value}) != codec.canonical({"v": text})


# ---- canonical ----

CANONICAL = [
    pytest.param(
        {"b": 1, "a": {"d": [], "c": None}}, b'{"a":{"c":null,"d":[]},"b":1}', id="sorted"
    ),
    pytest.param("é/日本", '"é/日本"'.encode(), id="raw-utf8-slash-as-is"),
    pytest.param({"n": 2**70}, b'{"n":' + BIG.encode() + b"}", id="big-int"),
    pytest.param({"z": "\ud800", "a": 1}, b'{"a":1,"z":"\\ud800"}', id="lone-surrogate-escaped"),
    pytest.param('\ud800\x1f"é', '"\\ud800\\u001f\\"é"'.encode(), id="surrogate-and-escapes"),
    pytest.param(
        {"\ud800": [L("NaN"), 1.5, True]}, b'{"\\ud800":[NaN,1.5,true]}', id="surrogate-key"
    ),
    pytest.param([-(2**63) - 1], b"[-9223372036854775809]", id="below-i64"),
    pytest.param(
        {"\U0001f600": 1, "\uffff": 2, "\ue000": 3, "a": 4},
        '{"a":4,"\ue000":3,"\uffff":2,"\U0001f600":1}'.encode(),
        id="code-point-order",
    ),
]


@pytest.mark.parametrize(("value", "expected"), CANONICAL)
def test_canonical(value: Any, expected: bytes) -> None:
    assert codec.canonical(value) == expected
    assert codec._canonical_slow(value) == expected


def test_canonical_refuses_what_is_not_json() -> None:
    with pytest.raises(TypeError):
        codec.canonical({"a": object()})


def test_dumps_value_keeps_key_order() -> None:
    value, _ = codec.read_value('{"b":1e400,"a":[NaN],"c":"\\ud800"}', 0)
    assert codec.dumps_value(value) == '{"b":1e400,"a":[NaN],"c":"\\ud800"}'
    assert codec.dumps_value({"b": 1, "a": 2}) == '{"b":1,"a":2}'


QUOTES = [
    pytest.param("persistent", '"persistent"', id="plain"),
    pytest.param('a"b\\', '"a\\"b\\\\"', id="escapes"),
    pytest.param("é", '"é"', id="non-ascii"),
    pytest.param("\ud800", '"\\ud800"', id="lone-surrogate"),
]


@pytest.mark.parametrize(("text", "expected"), QUOTES)
def test_quote(text: str, expected: str) -> None:
    assert codec.quote(text) == expected


ENCODINGS = [
    pytest.param(b'{"a":1}', "utf-8", id="utf-8"),
    pytest.param(b"\xef\xbb\xbf{}", "utf-8-sig", id="utf-8-bom"),
    pytest.param("{}".encode("utf-16-le"), "utf-16-le", id="utf-16-le"),
    pytest.param("{}".encode("utf-16-be"), "utf-16-be", id="utf-16-be"),
    pytest.param("{}".encode("utf-16"), "utf-16", id="utf-16-bom"),
    pytest.param("{}".encode("utf-32-le"), "utf-32-le", id="utf-32-le"),
]


@pytest.mark.parametrize(("data", "expected"), ENCODINGS)
def test_detect_encoding(data: bytes, expected: str) -> None:
    assert codec.detect_encoding(data) == expected


# ---- properties ----

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"))
)
writable = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(writable)
def test_fallback_canonical_is_orjsons_sorted_output(value: Any) -> None:
    expected = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    assert codec._canonical_slow(value) == expected
    assert codec.canonical(value) == expected


@given(st.text(st.characters(codec="utf-8")))
def test_surrogate_fallback_writes_other_characters_as_orjson(text: str) -> None:
    assert json.dumps(text, ensure_ascii=False).encode() == orjson.dumps(text)
    assert codec.canonical(text + "\ud800") == orjson.dumps(text)[:-1] + b'\\ud800"'


separators = st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", "\t:\r\n")])
stdlib_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=20,
)


@settings(max_examples=300)
@given(stdlib_values, separators, st.booleans())
def test_readers_agree_with_the_standard_library(
    value: Any, seps: tuple[str, str], ascii_only: bool
) -> None:
    text = json.dumps(value, separators=seps, ensure_ascii=ascii_only)
    expected = json.loads(text)
    assert codec.read_value(text, 0) == (expected, len(text))
    assert codec._read_deep(text, 0) == (expected, len(text))
