"""Marker validation, the 400 envelope, stripping and the forced ``include_usage``."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.core.errors import BodyReadError, MarkerError, RejectReason
from extproc.core.markers import (
    MAX_BREAKPOINTS,
    check_breakpoint_count,
    error_envelope,
    marker_tier,
    strip_markers,
)
from extproc.core.model import Tier, TierPolicy

ALL = TierPolicy()
SHORT = TierPolicy(enabled=frozenset({Tier.M5, Tier.H1}), default=Tier.M5)
HOUR_DEFAULT = TierPolicy(default=Tier.H1)
ONLY_DAY = TierPolicy(enabled=frozenset({Tier.H24}), default=Tier.H24)
WHERE = "messages[3].content[1]"

VALID = [
    pytest.param(None, ALL, None, id="null-is-no-marker"),
    pytest.param({"type": "ephemeral"}, ALL, Tier.M5, id="no-ttl-gets-default-5m"),
    pytest.param({"type": "ephemeral"}, HOUR_DEFAULT, Tier.H1, id="no-ttl-gets-default-1h"),
    pytest.param({"type": "ephemeral"}, ONLY_DAY, Tier.H24, id="no-ttl-gets-default-24h"),
    pytest.param({"type": "ephemeral", "ttl": "5m"}, ALL, Tier.M5, id="ttl-5m"),
    pytest.param({"type": "ephemeral", "ttl": "1h"}, ALL, Tier.H1, id="ttl-1h"),
    pytest.param({"type": "ephemeral", "ttl": "24h"}, ALL, Tier.H24, id="ttl-24h"),
    pytest.param({"type": "ephemeral", "ttl": "1h"}, SHORT, Tier.H1, id="ttl-1h-enabled-subset"),
    pytest.param({"ttl": "1h", "type": "ephemeral"}, ALL, Tier.H1, id="key-order-irrelevant"),
    pytest.param({"type": "ephemeral", "scope": "x"}, ALL, Tier.M5, id="extra-key-ignored"),
]


@pytest.mark.parametrize(("value", "policy", "expected"), VALID)
def test_valid_marker(value: object, policy: TierPolicy, expected: Tier | None) -> None:
    assert marker_tier(value, policy, WHERE) is expected


MALFORMED = RejectReason.MALFORMED
REJECTED = [
    pytest.param("ephemeral", ALL, MALFORMED, "must be an object or null", id="string"),
    pytest.param(["ephemeral"], ALL, MALFORMED, "must be an object or null", id="array"),
    pytest.param(1, ALL, MALFORMED, "must be an object or null", id="number"),
    pytest.param(True, ALL, MALFORMED, "must be an object or null", id="true"),
    pytest.param({}, ALL, MALFORMED, "type must be a string", id="type-missing"),
    pytest.param({"ttl": "5m"}, ALL, MALFORMED, "type must be a string", id="only-ttl"),
    pytest.param({"type": None}, ALL, MALFORMED, "type must be a string", id="type-null"),
    pytest.param({"type": 1}, ALL, MALFORMED, "type must be a string", id="type-number"),
    pytest.param({"type": {}}, ALL, MALFORMED, "type must be a string", id="type-object"),
    pytest.param(
        {"type": "ephemeral", "ttl": 300}, ALL, MALFORMED, "ttl must be a string", id="ttl-number"
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": None}, ALL, MALFORMED, "ttl must be a string", id="ttl-null"
    ),
    pytest.param(
        {"type": "persistent"},
        ALL,
        RejectReason.UNSUPPORTED_TYPE,
        'type "persistent" is not supported',
        id="type-persistent",
    ),
    pytest.param(
        {"type": "Ephemeral"},
        ALL,
        RejectReason.UNSUPPORTED_TYPE,
        'type "Ephemeral" is not supported',
        id="type-case-matters",
    ),
    pytest.param(
        {"type": ""}, ALL, RejectReason.UNSUPPORTED_TYPE, 'type "" is not', id="type-empty"
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": "10m"},
        ALL,
        RejectReason.INVALID_TTL,
        'ttl "10m" is not a known tier (5m, 1h, 24h)',
        id="ttl-unknown",
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": "5M"},
        ALL,
        RejectReason.INVALID_TTL,
        'ttl "5M" is not a known tier',
        id="ttl-case-matters",
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": ""},
        ALL,
        RejectReason.INVALID_TTL,
        'ttl "" is not a known tier',
        id="ttl-empty",
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": "24h"},
        SHORT,
        RejectReason.TIER_DISABLED,
        'ttl "24h" is not enabled here; available tiers: 5m, 1h',
        id="tier-24h-disabled",
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": "5m"},
        ONLY_DAY,
        RejectReason.TIER_DISABLED,
        'ttl "5m" is not enabled here; available tiers: 24h',
        id="tier-5m-disabled",
    ),
]


@pytest.mark.parametrize(("value", "policy", "reason", "detail"), REJECTED)
def test_rejected_marker(
    value: object, policy: TierPolicy, reason: RejectReason, detail: str
) -> None:
    with pytest.raises(MarkerError) as caught:
        marker_tier(value, policy, WHERE)
    err = caught.value
    assert err.reason is reason
    assert err.message.startswith(f"{reason.value}: {WHERE}.cache_control")
    assert detail in err.message
    assert err.code == "invalid_cache_control"
    assert err.param == "messages[].content[].cache_control"


@pytest.mark.parametrize("count", [pytest.param(n, id=f"{n}-breakpoints") for n in range(5)])
def test_breakpoint_count_accepted(count: int) -> None:
    check_breakpoint_count(count)


@pytest.mark.parametrize("count", [pytest.param(5, id="five"), pytest.param(40, id="forty")])
def test_breakpoint_count_rejected(count: int) -> None:
    with pytest.raises(MarkerError) as caught:
        check_breakpoint_count(count)
    assert caught.value.reason is RejectReason.TOO_MANY_BREAKPOINTS
    assert caught.value.message == (
        f"too_many_breakpoints: {count} cache_control breakpoints; "
        f"at most {MAX_BREAKPOINTS} are allowed"
    )


ENVELOPES = [
    pytest.param(
        MarkerError(RejectReason.INVALID_TTL, 'invalid_ttl: ttl "é/x"'),
        b'{"error":{"message":"invalid_ttl: ttl \\"\xc3\xa9/x\\"","type":"invalid_request_error",'
        b'"code":"invalid_cache_control","param":"messages[].content[].cache_control"}}',
        id="marker-error",
    ),
    pytest.param(
        BodyReadError("body too large"),
        b'{"error":{"message":"body too large","type":"invalid_request_error",'
        b'"code":"body_read_failed","param":null}}',
        id="body-read-error",
    ),
]


@pytest.mark.parametrize(("err", "expected"), ENVELOPES)
def test_error_envelope(err: MarkerError | BodyReadError, expected: bytes) -> None:
    assert error_envelope(err) == expected


def _text(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": text, **extra}


EPH = {"type": "ephemeral"}

STRIPS = [
    pytest.param(
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        False,
        False,
        id="plain-unchanged",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": [_text("a", cache_control=None)]}]},
        {"messages": [{"role": "user", "content": [_text("a")]}]},
        False,
        True,
        id="null-marker-stripped",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": [_text("a", cache_control=EPH), _text("b")]}]},
        {"messages": [{"role": "user", "content": [_text("a"), _text("b")]}]},
        True,
        True,
        id="marker-stripped",
    ),
    pytest.param(
        {
            "messages": [
                {"role": "user", "content": [_text("a", cache_control=None)]},
                {"role": "user", "content": [_text("b", cache_control=EPH)]},
                {"role": "user", "content": [_text("c", cache_control=None)]},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": [_text("a")]},
                {"role": "user", "content": [_text("b")]},
                {"role": "user", "content": [_text("c")]},
            ]
        },
        True,
        True,
        id="every-marker-stripped-after-a-real-one",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": [_text("a", meta={"cache_control": 1})]}]},
        {"messages": [{"role": "user", "content": [_text("a", meta={"cache_control": 1})]}]},
        False,
        False,
        id="nested-key-kept",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": "a", "cache_control": EPH}]},
        {"messages": [{"role": "user", "content": "a", "cache_control": EPH}]},
        False,
        False,
        id="message-level-key-kept",
    ),
    pytest.param(
        {"messages": {"role": "user"}, "stream": False},
        {"messages": {"role": "user"}, "stream": False},
        False,
        False,
        id="messages-not-a-list",
    ),
    pytest.param(
        {"messages": ["x", 1, None, {"content": ["x", None]}]},
        {"messages": ["x", 1, None, {"content": ["x", None]}]},
        False,
        False,
        id="odd-entries-ignored",
    ),
    pytest.param(
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        False,
        True,
        id="stream-options-created",
    ),
    pytest.param(
        {"stream": True, "stream_options": None},
        {"stream": True, "stream_options": {"include_usage": True}},
        False,
        True,
        id="stream-options-null-replaced",
    ),
    pytest.param(
        {"stream": True, "stream_options": {"continuous_usage_stats": True}},
        {"stream": True, "stream_options": {"continuous_usage_stats": True, "include_usage": True}},
        False,
        True,
        id="other-stream-options-kept",
    ),
    pytest.param(
        {"stream": True, "stream_options": {"include_usage": False}},
        {"stream": True, "stream_options": {"include_usage": True}},
        False,
        True,
        id="include-usage-false-forced",
    ),
    pytest.param(
        {"stream": True, "stream_options": {"include_usage": True}},
        {"stream": True, "stream_options": {"include_usage": True}},
        False,
        False,
        id="include-usage-already-true",
    ),
    pytest.param(
        {"stream": True, "stream_options": "usage"},
        {"stream": True, "stream_options": "usage"},
        False,
        False,
        id="non-object-stream-options-left-to-upstream",
    ),
    pytest.param(
        {"stream": False, "stream_options": {"include_usage": False}},
        {"stream": False, "stream_options": {"include_usage": False}},
        False,
        False,
        id="not-streaming-untouched",
    ),
    pytest.param({"stream": "true"}, {"stream": "true"}, False, False, id="stream-string"),
    pytest.param({"stream": 1}, {"stream": 1}, False, False, id="stream-one"),
]


@pytest.mark.parametrize(("body", "expected", "had_markers", "changed"), STRIPS)
def test_strip(
    body: dict[str, Any], expected: dict[str, Any], had_markers: bool, changed: bool
) -> None:
    result = strip_markers(body)
    assert body == expected
    assert (result.had_markers, result.changed) == (had_markers, changed)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
markers = st.none() | json_values | st.just(EPH)
blocks = st.dictionaries(
    st.sampled_from(["type", "text", "cache_control", "image_url"]), json_values, max_size=4
) | st.fixed_dictionaries(
    {"type": st.just("text"), "text": st.text()}, optional={"cache_control": markers}
)
contents = st.none() | st.text(max_size=5) | st.lists(blocks | json_values, max_size=4)
messages = st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": contents})
bodies = st.fixed_dictionaries(
    {"messages": st.lists(messages | json_values, max_size=4) | json_values},
    optional={
        "stream": st.booleans() | json_values,
        "stream_options": st.none()
        | json_values
        | st.dictionaries(st.just("include_usage"), json_values),
    },
)


@settings(deadline=None)
@given(bodies)
def test_strip_is_idempotent(body: dict[str, Any]) -> None:
    once = copy.deepcopy(body)
    strip_markers(once)
    twice = copy.deepcopy(once)
    again = strip_markers(twice)
    assert twice == once
    assert not again.changed
    assert not again.had_markers


@settings(deadline=None)
@given(bodies)
def test_strip_forces_usage_on_streams(body: dict[str, Any]) -> None:
    options = body.get("stream_options")
    editable = options is None or isinstance(options, dict)
    strip_markers(body)
    if body.get("stream") is True and editable:
        assert body["stream_options"]["include_usage"] is True
    elif body.get("stream") is not True:
        assert body.get("stream_options") == options


@settings(deadline=None)
@given(bodies)
def test_strip_leaves_no_block_marker(body: dict[str, Any]) -> None:
    strip_markers(body)
    for message in body["messages"] if isinstance(body["messages"], list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            assert not (isinstance(block, dict) and "cache_control" in block)
