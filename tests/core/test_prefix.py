"""Blocks, prefix hashes (checked against DESIGN's vectors and raw hashlib), walk-back."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.core.errors import MarkerError, RejectReason
from extproc.core.model import PrefixHash, Tier, TierPolicy
from extproc.core.prefix import (
    WALKBACK,
    Block,
    Breakpoint,
    prefix_hashes,
    scan,
    walkback_candidates,
)

POLICY = TierPolicy()


def _chain(*inputs: bytes) -> list[str]:
    """Independent reference: cumulative SHA-256 hex digests over the given block inputs."""
    running = hashlib.sha256()
    out = []
    for data in inputs:
        running.update(data)
        out.append(running.hexdigest())
    return out


def test_design_vectors() -> None:
    messages = [
        {"role": "system", "content": "static system"},
        {"role": "user", "content": "hi"},
    ]
    assert [h.hex() for h in prefix_hashes(messages)] == [
        "3f64b6de25662606fce3fdbfc38c06d90282a10f28a6a12496225051481cf3e2",
        "b063c46136d7e666f8ff6dfbb59370f23dd93a60e692faceb73da98351330939",
    ]


HASHES = [
    pytest.param(
        [{"role": "user", "content": "héllo 日本 🙂"}],
        [
            b'user\x00{"text":"h\xc3\xa9llo '
            b'\xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x99\x82","type":"text"}'
        ],
        id="non-ascii-raw-utf8",
    ),
    pytest.param(
        [{"role": "user", "content": "see a/b </script>"}],
        [b'user\x00{"text":"see a/b </script>","type":"text"}'],
        id="slash-not-escaped",
    ),
    pytest.param(
        [{"role": "user", "content": 'quote " back \\ tab \t nl \n'}],
        [b'user\x00{"text":"quote \\" back \\\\ tab \\t nl \\n","type":"text"}'],
        id="json-escapes",
    ),
    pytest.param(
        [
            {
                "role": "tool",
                "content": [{"z": {"b": [1, {"d": 2, "c": None}], "a": True}, "y": 1.5}],
            }
        ],
        [b'tool\x00{"y":1.5,"z":{"a":true,"b":[1,{"c":null,"d":2}]}}'],
        id="nested-keys-sorted",
    ),
    pytest.param(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look", "cache_control": {"type": "ephemeral"}},
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                ],
            }
        ],
        [
            b'user\x00{"text":"look","type":"text"}',
            b'user\x00{"image_url":{"url":"https://x.test/a.png"},"type":"image_url"}',
        ],
        id="image-block-and-marker-excluded",
    ),
    pytest.param(
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a", "meta": {"cache_control": 1}}],
            }
        ],
        [b'user\x00{"meta":{"cache_control":1},"text":"a","type":"text"}'],
        id="nested-cache-control-kept",
    ),
    pytest.param(
        [{"role": 7, "content": "x"}, {"content": "y"}],
        [b'\x00{"text":"x","type":"text"}', b'\x00{"text":"y","type":"text"}'],
        id="non-string-role-is-empty",
    ),
    pytest.param(
        [{"role": "user", "content": ["plain", 3, None]}],
        [b'user\x00"plain"', b"user\x003", b"user\x00null"],
        id="non-object-elements",
    ),
    pytest.param(
        [
            {"role": "user", "content": None},
            {"role": "user"},
            {"role": "user", "content": 5},
            "junk",
            {"role": "user", "content": []},
            {"role": "assistant", "content": "ok"},
        ],
        [b'assistant\x00{"text":"ok","type":"text"}'],
        id="empty-content-contributes-nothing",
    ),
    pytest.param({"role": "user", "content": "x"}, [], id="messages-not-a-list"),
    pytest.param(None, [], id="messages-null"),
]


@pytest.mark.parametrize(("messages", "inputs"), HASHES)
def test_prefix_hashes(messages: Any, inputs: list[bytes]) -> None:
    assert [h.hex() for h in prefix_hashes(messages)] == _chain(*inputs)


def _user(*blocks: object) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def _text(text: str, marker: object = "absent") -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": text}
    if marker != "absent":
        block["cache_control"] = marker
    return block


MARKER_VARIANTS = [
    pytest.param("absent", id="no-marker"),
    pytest.param(None, id="null-marker"),
    pytest.param({"type": "ephemeral"}, id="default-marker"),
    pytest.param({"type": "ephemeral", "ttl": "1h"}, id="1h-marker"),
    pytest.param({"type": "ephemeral", "ttl": "24h"}, id="24h-marker"),
]


@pytest.mark.parametrize("marker", MARKER_VARIANTS)
def test_marker_never_changes_hash(marker: object) -> None:
    plain = [_user(_text("a"), _text("b")), _user(_text("c"))]
    marked = [_user(_text("a"), _text("b", marker)), _user(_text("c", marker))]
    assert prefix_hashes(marked) == prefix_hashes(plain)


def test_different_content_different_hash() -> None:
    assert prefix_hashes([_user(_text("a"))]) != prefix_hashes([_user(_text("b"))])
    assert prefix_hashes([_user(_text("a"))]) != prefix_hashes(
        [{"role": "system", "content": [_text("a")]}]
    )


EPH_1H = {"type": "ephemeral", "ttl": "1h"}
BLOCKS = [
    pytest.param(
        [{"role": "system", "content": "sys"}],
        [Block("system", "text", "sys", None)],
        id="string-content",
    ),
    pytest.param(
        [_user(_text("a", {"type": "ephemeral"}), _text("bc", None), _text("d", EPH_1H))],
        [
            Block("user", "text", "a", Tier.M5),
            Block("user", "text", "bc", None),
            Block("user", "text", "d", Tier.H1),
        ],
        id="array-with-markers",
    ),
    pytest.param(
        [_user({"type": "image_url", "image_url": {"url": "u"}, "cache_control": EPH_1H})],
        [Block("user", "image_url", "", Tier.H1)],
        id="image-block-has-no-text",
    ),
    pytest.param(
        [_user({"type": 3, "text": ["x"]}, "raw", {})],
        [Block("user", "", "", None), Block("user", "", "", None), Block("user", "", "", None)],
        id="odd-blocks",
    ),
    pytest.param([{"role": None, "content": "x"}], [Block("", "text", "x", None)], id="null-role"),
    pytest.param("nope", [], id="messages-not-a-list"),
]


@pytest.mark.parametrize(("messages", "expected"), BLOCKS)
def test_scan_blocks(messages: Any, expected: list[Block]) -> None:
    scanned = scan(messages, POLICY)
    assert list(scanned.blocks) == expected
    assert scanned.hashes == prefix_hashes(messages)


REJECTED_BLOCKS = [
    pytest.param(
        [{"role": "system", "content": "s"}, _user(_text("a"), _text("b", "ephemeral"))],
        RejectReason.MALFORMED,
        "malformed_cache_control: messages[1].content[1].cache_control must be",
        id="malformed-names-its-block",
    ),
    pytest.param(
        [_user(_text("a", {"type": "ephemeral", "ttl": "2h"}))],
        RejectReason.INVALID_TTL,
        'invalid_ttl: messages[0].content[0].cache_control.ttl "2h"',
        id="invalid-ttl",
    ),
    pytest.param(
        [_user(*(_text(str(i), {"type": "ephemeral"}) for i in range(5)))],
        RejectReason.TOO_MANY_BREAKPOINTS,
        "too_many_breakpoints: 5 cache_control breakpoints",
        id="five-breakpoints",
    ),
    pytest.param(
        [_user(_text(str(i), {"type": "ephemeral"})) for i in range(6)],
        RejectReason.TOO_MANY_BREAKPOINTS,
        "too_many_breakpoints: 6 cache_control breakpoints",
        id="six-breakpoints-across-messages",
    ),
]


@pytest.mark.parametrize(("messages", "reason", "prefix"), REJECTED_BLOCKS)
def test_scan_rejects(messages: Any, reason: RejectReason, prefix: str) -> None:
    with pytest.raises(MarkerError) as caught:
        scan(messages, POLICY)
    assert caught.value.reason is reason
    assert caught.value.message.startswith(prefix)


def test_four_breakpoints_and_nulls_accepted() -> None:
    marked = [_text(str(i), {"type": "ephemeral"}) for i in range(4)]
    scanned = scan([_user(*marked, _text("x", None), _text("y", None))], POLICY)
    assert scanned.breakpoints == tuple(Breakpoint(i, Tier.M5) for i in range(4))


def test_breakpoints_in_block_order() -> None:
    messages = [
        {"role": "system", "content": "s"},
        _user(_text("a", {"type": "ephemeral", "ttl": "24h"}), _text("b")),
        _user(_text("c", {"type": "ephemeral"})),
    ]
    assert scan(messages, POLICY).breakpoints == (Breakpoint(1, Tier.H24), Breakpoint(3, Tier.M5))


def _fake_hashes(n: int) -> list[PrefixHash]:
    return [PrefixHash(i.to_bytes(32, "big")) for i in range(n)]


WALKS = [
    pytest.param([0], list(range(0, -1, -1)), id="first-block"),
    pytest.param([5], list(range(5, -1, -1)), id="clipped-at-zero"),
    pytest.param([19], list(range(19, -1, -1)), id="exactly-twenty"),
    pytest.param([20], list(range(20, 0, -1)), id="twenty-one-blocks-drops-first"),
    pytest.param([30], list(range(30, 10, -1)), id="deep-window"),
    pytest.param([19, 20], list(range(20, -1, -1)), id="overlap-deduplicated"),
    pytest.param([3, 40], [*range(40, 20, -1), 3, 2, 1, 0], id="disjoint-windows"),
    pytest.param([2, 5, 9, 12], list(range(12, -1, -1)), id="four-nested"),
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


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=8)
blocks_st = st.fixed_dictionaries(
    {"type": st.just("text"), "text": texts},
    optional={"cache_control": st.none() | st.just({"type": "ephemeral"})},
)
message_st = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool"]),
        "content": texts | st.lists(blocks_st, max_size=3) | st.none(),
    }
)


@settings(deadline=None)
@given(st.lists(message_st, max_size=6), st.integers(min_value=0, max_value=6))
def test_hashes_of_prefix_are_prefix_of_hashes(messages: list[Any], cut: int) -> None:
    head = messages[:cut]
    head_hashes = prefix_hashes(head)
    assert prefix_hashes(messages)[: len(head_hashes)] == head_hashes
    assert len(head_hashes) <= len(prefix_hashes(messages))


@settings(deadline=None)
@given(st.lists(message_st, max_size=6))
def test_hashes_ignore_markers(messages: list[Any]) -> None:
    unmarked = [
        {
            **m,
            "content": [{k: v for k, v in b.items() if k != "cache_control"} for b in m["content"]]
            if isinstance(m["content"], list)
            else m["content"],
        }
        for m in messages
    ]
    assert prefix_hashes(messages) == prefix_hashes(unmarked)
