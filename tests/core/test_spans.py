"""The shape-driven reader with offsets, and ``Splice`` for byte-exact edits."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.core import spans
from extproc.core.codec import Literal
from extproc.core.spans import LEAF, SHALLOW, Arr, Node, NotJson, Obj, Splice

SHAPE = Obj({"list": Arr(SHALLOW), "inner": SHALLOW})


def _slice(text: str, node: Node) -> str:
    return text[node.start : node.end]


def test_walked_object_records_every_member_with_offsets() -> None:
    text = ' \n{ "a" : 1e400 ,"list":[ {"k":NaN} , 7 ],"a":"\\ud800", "inner":{"x":[1]} }\t'
    root = spans.read(text, SHAPE)
    assert [m.key for m in root.members or ()] == ["a", "list", "a", "inner"]
    assert [_slice(text, m.node) for m in root.members or ()] == [
        "1e400",
        '[ {"k":NaN} , 7 ]',
        '"\\ud800"',
        '{"x":[1]}',
    ]
    assert [text[m.start : m.end] for m in root.named("a")] == ['"a" : 1e400', '"a":"\\ud800"']
    assert root.value["a"] == "\ud800"  # the last of duplicate names wins
    assert root.get("a") is root.named("a")[-1].node
    assert root.get("absent") is None
    items = root.get("list")
    assert items is not None
    assert items.items is not None
    assert [_slice(text, n) for n in items.items] == ['{"k":NaN}', "7"]
    assert items.items[0].members is not None  # walked by SHALLOW
    assert items.items[0].value == {"k": Literal("NaN")}
    inner = root.get("inner")
    assert inner is not None
    assert inner.members is not None
    assert inner.members[0].node.members is None  # read whole below the shape
    assert _slice(text, root) == text.strip()


READ_VALID = [
    pytest.param("{}", SHAPE, {}, id="empty-object"),
    pytest.param("\ufeff{}", SHAPE, {}, id="utf8-bom"),
    pytest.param(' {"list": {}} ', SHAPE, {"list": {}}, id="shape-mismatch-read-whole"),
    pytest.param('{"list": []}', SHAPE, {"list": []}, id="empty-walked-array"),
    pytest.param("[1, 2]", SHAPE, [1, 2], id="root-not-an-object"),
    pytest.param('"s"', LEAF, "s", id="leaf"),
    pytest.param("[" * 3000 + "]" * 3000, SHAPE, None, id="deep-root"),
]


@pytest.mark.parametrize(("text", "shape", "value"), READ_VALID)
def test_read(text: str, shape: spans.Shape, value: Any) -> None:
    root = spans.read(text, shape)
    if value is not None:
        assert root.value == value
    assert _slice(text, root) == text.strip().removeprefix("\ufeff")


READ_REJECTED = [
    pytest.param("", id="empty"),
    pytest.param("   ", id="only-white-space"),
    pytest.param('{"a":1} {}', id="two-values"),
    pytest.param('{"a":1,}', id="trailing-comma"),
    pytest.param('{"list":[1,]}', id="trailing-comma-in-walked-array"),
    pytest.param('{"a" 1}', id="missing-colon"),
    pytest.param('{"a":1 "b":2}', id="missing-comma"),
    pytest.param("{a:1}", id="unquoted-name"),
    pytest.param('{"a":1', id="truncated"),
    pytest.param('{"list":[1', id="truncated-in-walked-array"),
    pytest.param("\ufeff\ufeff{}", id="two-boms"),
    pytest.param("{}\u00a0", id="non-json-white-space"),
    pytest.param("\x0c{}", id="form-feed"),
]


@pytest.mark.parametrize("text", READ_REJECTED)
def test_read_rejects(text: str) -> None:
    with pytest.raises(NotJson):
        spans.read(text, SHAPE)


@given(st.binary())
def test_decode_encode_round_trip_any_bytes(raw: bytes) -> None:
    assert spans.encode(spans.decode(raw)) == raw


def test_invalid_utf8_inside_a_string_is_read_and_kept() -> None:
    raw = b'{"a":"\xff\xfe ok","b":1}'
    text = spans.decode(raw)
    root = spans.read(text, SHAPE)
    node = root.get("a")
    assert node is not None
    assert spans.encode(text[node.start : node.end]) == b'"\xff\xfe ok"'


# ---- splicing ----

SPLICES = [
    pytest.param([], "abcdef", id="nothing"),
    pytest.param([(1, 3, "X")], "aXdef", id="replace"),
    pytest.param([(2, 2, "+")], "ab+cdef", id="insert"),
    pytest.param([(4, 5, ""), (0, 1, "")], "bcdf", id="order-of-edits-irrelevant"),
    pytest.param([(1, 5, ""), (2, 3, "X")], "af", id="edit-inside-a-cut-dropped"),
    pytest.param([(2, 4, "-"), (2, 2, "+")], "ab+-ef", id="insert-before-a-cut-at-its-start"),
    pytest.param([(2, 3, ""), (2, 5, "")], "abf", id="widest-cut-wins"),
    pytest.param([(6, 6, "!")], "abcdef!", id="insert-at-end"),
    pytest.param([(1, 2, ""), (2, 2, "+")], "a+cdef", id="insert-right-after-a-cut"),
]


@pytest.mark.parametrize(("edits", "expected"), SPLICES)
def test_splice_apply(edits: list[tuple[int, int, str]], expected: str) -> None:
    splice = Splice()
    for start, end, replacement in edits:
        splice.replace(start, end, replacement)
    assert bool(splice) is bool(edits)
    assert splice.apply("abcdef") == expected


def test_splice_insert_is_an_empty_replace() -> None:
    splice = Splice()
    splice.insert(3, "+")
    assert splice.edits == [(3, 3, "+")]
    assert splice.apply("abcdef") == "abc+def"


OBJECT_TEXTS = [
    pytest.param('{"a":1,"b":[2],"c":{"d":3}}', id="compact"),
    pytest.param('{ "a" : 1 ,\n "b" :[2] ,\t"c":{"d":3}\r\n}', id="white-space"),
]


@pytest.mark.parametrize("text", OBJECT_TEXTS)
@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(set(c), id="cut-" + ("".join(map(str, c)) or "none"))
        for n in range(4)
        for c in itertools.combinations(range(3), n)
    ],
)
def test_cut_members_keeps_valid_json(text: str, cut: set[int]) -> None:
    root = spans.read(text, SHALLOW)
    members = root.members or ()
    splice = Splice()
    splice.cut_members(members, cut)
    result = splice.apply(text)
    kept = [m for i, m in enumerate(members) if i not in cut]
    assert json.loads(result) == {m.key: json.loads(text[m.node.start : m.node.end]) for m in kept}
    for member in kept:  # every kept member byte for byte
        assert text[member.start : member.end] in result


@pytest.mark.parametrize("cut", [pytest.param({i}, id=f"element-{i}") for i in range(3)])
def test_cut_elements_of_an_array(cut: set[int]) -> None:
    text = '{"list":[ {"x":1} , 2 ,"three" ]}'
    root = spans.read(text, SHAPE)
    items = root.get("list")
    assert items is not None
    assert items.items is not None
    splice = Splice()
    splice.cut_members(items.items, cut)
    expected = [v for i, v in enumerate([{"x": 1}, 2, "three"]) if i not in cut]
    assert json.loads(splice.apply(text)) == {"list": expected}


white = st.sampled_from(["", " ", "\n", "\t", "\r\n "])
member_values = st.sampled_from(["1", '"s"', "[1, 2]", '{"k": null}', "1e400", "NaN"])


@st.composite
def objects(draw: st.DrawFn) -> str:
    count = draw(st.integers(1, 6))
    parts = [
        draw(white) + f'"m{i}"' + draw(white) + ":" + draw(white) + draw(member_values)
        for i in range(count)
    ]
    return "{" + ",".join(p + draw(white) for p in parts) + "}"


@settings(max_examples=200)
@given(objects(), st.data())
def test_cut_members_property(text: str, data: st.DataObject) -> None:
    root = spans.read(text, SHALLOW)
    members = root.members or ()
    cut = data.draw(st.sets(st.integers(0, len(members) - 1)))
    splice = Splice()
    splice.cut_members(members, cut)
    result = splice.apply(text)
    kept = spans.read(result, SHALLOW)
    assert [m.key for m in kept.members or ()] == [
        m.key for i, m in enumerate(members) if i not in cut
    ]
    for member in kept.members or ():
        original = root.get(member.key)
        assert original is not None
        assert result[member.node.start : member.node.end] == text[original.start : original.end]
