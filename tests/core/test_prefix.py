"""Hash bodies, cumulative prefix hashes (DESIGN's vectors, raw hashlib) and the walk-back."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.core.codec import Literal
from extproc.core.model import PrefixHash, Tier
from extproc.core.prefix import (
    WALKBACK,
    Block,
    Breakpoint,
    object_body,
    prefix_hashes,
    string_body,
    value_body,
    walkback_candidates,
)

VECTOR_0 = "3f64b6de25662606fce3fdbfc38c06d90282a10f28a6a12496225051481cf3e2"
VECTOR_1 = "b063c46136d7e666f8ff6dfbb59370f23dd93a60e692faceb73da98351330939"


def _chain(*inputs: bytes) -> list[str]:
    """Independent reference: cumulative SHA-256 hex digests over the given block inputs."""
    running = hashlib.sha256()
    out = []
    for data in inputs:
        running.update(data)
        out.append(running.hexdigest())
    return out


def _block(role: str, body: bytes) -> Block:
    return Block(role, "text", "", body, "here")


def test_design_vectors() -> None:
    blocks = [_block("system", string_body("static system")), _block("user", string_body("hi"))]
    assert [h.hex() for h in prefix_hashes(blocks)] == [VECTOR_0, VECTOR_1]
    assert _chain(
        b'system\x00{"text":"static system","type":"text"}', b'user\x00{"text":"hi","type":"text"}'
    ) == [VECTOR_0, VECTOR_1]


BODIES = [
    pytest.param(string_body("hi"), b'{"text":"hi","type":"text"}', id="string-content"),
    pytest.param(
        string_body("héllo 日本 🙂"),
        '{"text":"héllo 日本 🙂","type":"text"}'.encode(),
        id="non-ascii-raw-utf8",
    ),
    pytest.param(
        string_body("see a/b </script>"),
        b'{"text":"see a/b </script>","type":"text"}',
        id="slash-not-escaped",
    ),
    pytest.param(
        string_body('quote " back \\ tab \t nl \n'),
        b'{"text":"quote \\" back \\\\ tab \\t nl \\n","type":"text"}',
        id="json-escapes",
    ),
    pytest.param(
        object_body({"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}),
        b'{"text":"a","type":"text"}',
        id="own-marker-left-out",
    ),
    pytest.param(
        object_body({"type": "text", "text": "a", "cache_control": None}),
        b'{"text":"a","type":"text"}',
        id="own-null-marker-left-out",
    ),
    pytest.param(
        object_body({"text": "a", "meta": {"cache_control": 1}}),
        b'{"meta":{"cache_control":1},"text":"a"}',
        id="nested-marker-is-content",
    ),
    pytest.param(
        object_body({"z": {"b": [1, {"d": 2, "c": None}], "a": True}, "y": 1.5}),
        b'{"y":1.5,"z":{"a":true,"b":[1,{"c":null,"d":2}]}}',
        id="keys-sorted-at-every-depth",
    ),
    pytest.param(
        object_body({"n": Literal("1e400"), "m": 2**70, "s": "\ud800"}),
        b'{"m":1180591620717411303424,"n":1e400,"s":"\\ud800"}',
        id="hostile-values",
    ),
    pytest.param(value_body("plain"), b'"plain"', id="string-element"),
    pytest.param(value_body(3), b"3", id="number-element"),
    pytest.param(value_body(None), b"null", id="null-element"),
    pytest.param(value_body(Literal("NaN")), b"NaN", id="literal-element"),
    pytest.param(
        value_body({"type": "function", "cache_control": {"type": "ephemeral"}}),
        b'{"type":"function"}',
        id="tool-entry-loses-its-marker",
    ),
]


@pytest.mark.parametrize(("body", "expected"), BODIES)
def test_hash_body(body: bytes, expected: bytes) -> None:
    assert body == expected


def test_string_content_hashes_as_its_text_block() -> None:
    assert string_body("x") == object_body({"type": "text", "text": "x"})


def test_object_body_does_not_mutate() -> None:
    block = {"text": "a", "cache_control": {"type": "ephemeral"}}
    object_body(block)
    assert block == {"text": "a", "cache_control": {"type": "ephemeral"}}


HASHES = [
    pytest.param([], [], id="no-blocks"),
    pytest.param(
        [("user", b'"x"'), ("tool_definition", b'{"type":"function"}')],
        [b'user\x00"x"', b'tool_definition\x00{"type":"function"}'],
        id="roles-and-bodies",
    ),
    pytest.param([("", b"1")], [b"\x001"], id="empty-role"),
    pytest.param([("r\u00e9", b"1")], ["ré\x001".encode()], id="non-ascii-role"),
    pytest.param([("\ud800", b"1")], [b"\xed\xa0\x80\x001"], id="surrogate-role"),
]


@pytest.mark.parametrize(("blocks", "inputs"), HASHES)
def test_prefix_hashes(blocks: list[tuple[str, bytes]], inputs: list[bytes]) -> None:
    hashes = prefix_hashes(_block(role, body) for role, body in blocks)
    assert [h.hex() for h in hashes] == _chain(*inputs)
    assert all(len(h) == 32 for h in hashes)


def test_only_role_and_body_are_hashed() -> None:
    a = Block("user", "text", "tokenized", b"1", "messages[0].content", Tier.H1)
    b = Block("user", "image", "", b"1", "tools[3]", None)
    assert prefix_hashes([a]) == prefix_hashes([b])
    assert prefix_hashes([a]) != prefix_hashes([Block("system", "text", "", b"1", "x")])


def _fake_hashes(n: int) -> list[PrefixHash]:
    return [PrefixHash(i.to_bytes(32, "big")) for i in range(n)]


WALKS = [
    pytest.param([0], [0], id="first-block"),
    pytest.param([5], list(range(5, -1, -1)), id="clipped-at-zero"),
    pytest.param([19], list(range(19, -1, -1)), id="exactly-twenty"),
    pytest.param([20], list(range(20, 0, -1)), id="twenty-one-blocks-drops-first"),
    pytest.param([30], list(range(30, 10, -1)), id="deep-window"),
    pytest.param([19, 20], list(range(20, -1, -1)), id="overlap-deduplicated"),
    pytest.param([3, 40], [*range(40, 20, -1), 3, 2, 1, 0], id="disjoint-windows"),
    pytest.param([2, 5, 9, 12], list(range(12, -1, -1)), id="four-nested"),
    pytest.param([12, 12], list(range(12, -1, -1)), id="explicit-and-automatic-on-one-block"),
    pytest.param([], [], id="no-breakpoints"),
]


@pytest.mark.parametrize(("blocks", "expected"), WALKS)
def test_walkback_candidates(blocks: list[int], expected: list[int]) -> None:
    hashes = _fake_hashes(50)
    points = [Breakpoint(b, Tier.M5) for b in blocks]
    candidates = walkback_candidates(points, hashes)
    assert [c.block for c in candidates] == expected
    assert all(c.prefix_hash == hashes[c.block] for c in candidates)


def test_walkback_is_twenty_boundaries() -> None:
    assert WALKBACK == 20


roles = st.sampled_from(["system", "user", "assistant", "tool_definition", "tool_call", ""])
texts = st.text(st.characters(codec="utf-8"), max_size=8)
block_values: st.SearchStrategy[Any] = st.dictionaries(
    st.sampled_from(["type", "text", "cache_control", "image_url"]), texts | st.none(), max_size=4
)
blocks = st.builds(lambda role, value: _block(role, value_body(value)), roles, block_values | texts)


@given(st.lists(blocks, max_size=8), st.integers(0, 8))
def test_hashes_of_a_prefix_are_a_prefix_of_the_hashes(chain: list[Block], cut: int) -> None:
    whole = prefix_hashes(chain)
    assert prefix_hashes(chain[:cut]) == whole[:cut]
    assert len(whole) == len(chain)


markers = st.none() | st.just({"type": "ephemeral"}) | st.just({"type": "ephemeral", "ttl": "1h"})


@given(st.dictionaries(st.sampled_from(["type", "text", "x"]), texts), markers)
def test_a_marker_never_changes_a_hash_body(value: dict[str, Any], marker: object) -> None:
    assert object_body({**value, "cache_control": marker}) == object_body(value)
    assert value_body({**value, "cache_control": marker}) == value_body(value)
