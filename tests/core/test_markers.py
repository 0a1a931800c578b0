"""Marker validation, automatic placement and the 400 envelope (DESIGN §3.0.1, §4.1, §4.2).

The messages are the reference's word for word: every rejected row spells its message out.
"""

from __future__ import annotations

import pytest

from extproc.core.codec import Literal
from extproc.core.errors import (
    BodyReadError,
    BreakpointParamError,
    ClientError,
    MarkerError,
    RejectReason,
)
from extproc.core.markers import (
    CONFLICT_MESSAGE,
    MAX_BREAKPOINTS,
    NO_SLOT_MESSAGE,
    Placement,
    check_breakpoint_count,
    error_envelope,
    marker_tier,
    place_automatic,
    require_enabled,
)
from extproc.core.model import Tier, TierPolicy

ALL = TierPolicy()
SHORT = TierPolicy(enabled=frozenset({Tier.M5, Tier.H1}))
HOUR_DEFAULT = TierPolicy(default=Tier.H1)
ONLY_DAY = TierPolicy(enabled=frozenset({Tier.H24}), default=Tier.H24)
M5, H1, H24 = Tier.M5, Tier.H1, Tier.H24

MALFORMED = (
    'cache_control must be an object with a string "type": "ephemeral" '
    '(and an optional string "ttl")'
)

VALID = [
    pytest.param(None, ALL, None, id="null-is-no-marker"),
    pytest.param({"type": "ephemeral"}, ALL, M5, id="no-ttl-gets-default-5m"),
    pytest.param({"type": "ephemeral"}, HOUR_DEFAULT, H1, id="no-ttl-gets-default-1h"),
    pytest.param({"type": "ephemeral"}, ONLY_DAY, H24, id="no-ttl-gets-default-24h"),
    pytest.param({"type": "ephemeral", "ttl": "5m"}, ALL, M5, id="ttl-5m"),
    pytest.param({"type": "ephemeral", "ttl": "1h"}, ALL, H1, id="ttl-1h"),
    pytest.param({"type": "ephemeral", "ttl": "24h"}, ALL, H24, id="ttl-24h"),
    pytest.param({"type": "ephemeral", "ttl": "1h"}, SHORT, H1, id="ttl-1h-enabled-subset"),
    pytest.param({"ttl": "1h", "type": "ephemeral"}, ALL, H1, id="key-order-irrelevant"),
    pytest.param({"type": "ephemeral", "scope": "x"}, ALL, M5, id="extra-key-ignored"),
]


@pytest.mark.parametrize(("value", "policy", "expected"), VALID)
def test_valid_marker(value: object, policy: TierPolicy, expected: Tier | None) -> None:
    assert marker_tier(value, policy) is expected


R = RejectReason
REJECTED = [
    pytest.param("ephemeral", ALL, R.MALFORMED, MALFORMED, id="string"),
    pytest.param(["ephemeral"], ALL, R.MALFORMED, MALFORMED, id="array"),
    pytest.param(1, ALL, R.MALFORMED, MALFORMED, id="number"),
    pytest.param(True, ALL, R.MALFORMED, MALFORMED, id="true"),
    pytest.param(False, ALL, R.MALFORMED, MALFORMED, id="false"),
    pytest.param(Literal("NaN"), ALL, R.MALFORMED, MALFORMED, id="nan-literal"),
    pytest.param({}, ALL, R.MALFORMED, MALFORMED, id="type-missing"),
    pytest.param({"ttl": "5m"}, ALL, R.MALFORMED, MALFORMED, id="only-ttl"),
    pytest.param({"type": None}, ALL, R.MALFORMED, MALFORMED, id="type-null"),
    pytest.param({"type": 1}, ALL, R.MALFORMED, MALFORMED, id="type-number"),
    pytest.param({"type": {}}, ALL, R.MALFORMED, MALFORMED, id="type-object"),
    pytest.param({"type": Literal("Infinity")}, ALL, R.MALFORMED, MALFORMED, id="type-literal"),
    pytest.param({"type": "ephemeral", "ttl": 300}, ALL, R.MALFORMED, MALFORMED, id="ttl-number"),
    pytest.param({"type": "ephemeral", "ttl": None}, ALL, R.MALFORMED, MALFORMED, id="ttl-null"),
    pytest.param({"type": "ephemeral", "ttl": ["5m"]}, ALL, R.MALFORMED, MALFORMED, id="ttl-list"),
    pytest.param(
        {"type": "ephemeral", "ttl": Literal("1e400")}, ALL, R.MALFORMED, MALFORMED, id="ttl-lit"
    ),
    pytest.param(
        {"type": "persistent"},
        ALL,
        R.UNSUPPORTED_TYPE,
        'unsupported cache_control type: "persistent" (only "ephemeral")',
        id="type-persistent",
    ),
    pytest.param(
        {"type": "Ephemeral"},
        ALL,
        R.UNSUPPORTED_TYPE,
        'unsupported cache_control type: "Ephemeral" (only "ephemeral")',
        id="type-case-matters",
    ),
    pytest.param(
        {"type": ""},
        ALL,
        R.UNSUPPORTED_TYPE,
        'unsupported cache_control type: "" (only "ephemeral")',
        id="type-empty",
    ),
    pytest.param(
        {"type": 'a"b\\é'},
        ALL,
        R.UNSUPPORTED_TYPE,
        'unsupported cache_control type: "a\\"b\\\\é" (only "ephemeral")',
        id="type-quoted-as-json",
    ),
    pytest.param(
        {"type": "persistent", "ttl": 5},
        ALL,
        R.UNSUPPORTED_TYPE,
        'unsupported cache_control type: "persistent" (only "ephemeral")',
        id="type-checked-before-ttl",
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": "2h"},
        ALL,
        R.INVALID_TTL,
        'invalid cache_control ttl: "2h"',
        id="ttl-unknown",
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": "5M"},
        ALL,
        R.INVALID_TTL,
        'invalid cache_control ttl: "5M"',
        id="ttl-case-matters",
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": ""},
        ALL,
        R.INVALID_TTL,
        'invalid cache_control ttl: ""',
        id="ttl-empty",
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": "2h"},
        SHORT,
        R.INVALID_TTL,
        'invalid cache_control ttl: "2h"',
        id="unknown-ttl-even-with-a-subset",
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": "24h"},
        SHORT,
        R.TIER_DISABLED,
        "cache_control ttl tier '24h' is not currently available; available tiers: 5m, 1h",
        id="tier-24h-disabled",
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": "5m"},
        ONLY_DAY,
        R.TIER_DISABLED,
        "cache_control ttl tier '5m' is not currently available; available tiers: 24h",
        id="tier-5m-disabled",
    ),
]


@pytest.mark.parametrize(("value", "policy", "reason", "message"), REJECTED)
def test_rejected_marker(value: object, policy: TierPolicy, reason: R, message: str) -> None:
    with pytest.raises(MarkerError) as caught:
        marker_tier(value, policy)
    err = caught.value
    assert err.reason is reason
    assert err.message == message == str(err)
    assert (err.code, err.param) == ("invalid_cache_control", "cache_control")


@pytest.mark.parametrize(
    ("tier", "policy", "available"),
    [
        pytest.param(H1, TierPolicy(frozenset({M5})), "5m", id="1h-off"),
        pytest.param(H24, SHORT, "5m, 1h", id="24h-off"),
        pytest.param(M5, TierPolicy(frozenset({H24, H1}), H1), "1h, 24h", id="canonical-order"),
    ],
)
def test_require_enabled_rejects(tier: Tier, policy: TierPolicy, available: str) -> None:
    with pytest.raises(MarkerError) as caught:
        require_enabled(tier, policy)
    assert caught.value.reason is R.TIER_DISABLED
    assert caught.value.message == (
        f"cache_control ttl tier '{tier.value}' is not currently available; "
        f"available tiers: {available}"
    )


def test_require_enabled_accepts() -> None:
    assert require_enabled(H1, SHORT) is H1


@pytest.mark.parametrize("count", [pytest.param(n, id=f"{n}-breakpoints") for n in range(5)])
def test_breakpoint_count_accepted(count: int) -> None:
    check_breakpoint_count(count)


@pytest.mark.parametrize("count", [pytest.param(5, id="five"), pytest.param(40, id="forty")])
def test_breakpoint_count_rejected(count: int) -> None:
    with pytest.raises(MarkerError) as caught:
        check_breakpoint_count(count)
    assert caught.value.reason is R.TOO_MANY_BREAKPOINTS
    assert caught.value.message == "too many cache_control breakpoints (max 4)"
    assert MAX_BREAKPOINTS == 4


PLACED = [
    pytest.param(M5, [], Placement(None, M5), id="no-blocks-no-op"),
    pytest.param(H1, [None], Placement(0, H1), id="single-block"),
    pytest.param(H1, [M5, None, None], Placement(2, H1), id="last-block-unmarked"),
    pytest.param(H1, [H1], Placement(None, H1), id="same-tier-on-last-is-no-op"),
    pytest.param(M5, [H1, H1, H1, M5], Placement(None, M5), id="same-tier-with-four-explicit"),
    pytest.param(H24, [M5, H1, H24, None], Placement(3, H24), id="three-explicit-one-slot"),
]


@pytest.mark.parametrize(("tier", "tiers", "expected"), PLACED)
def test_place_automatic(tier: Tier, tiers: list[Tier | None], expected: Placement) -> None:
    assert place_automatic(tier, tiers) == expected


NOT_PLACED = [
    pytest.param(H1, [M5], R.AUTOMATIC_TTL_CONFLICT, CONFLICT_MESSAGE, id="other-tier-on-last"),
    pytest.param(M5, [None, H24], R.AUTOMATIC_TTL_CONFLICT, CONFLICT_MESSAGE, id="24h-on-last"),
    pytest.param(H1, [M5, M5, M5, M5, None], R.AUTOMATIC_NO_SLOT, NO_SLOT_MESSAGE, id="four-used"),
    pytest.param(
        H1, [M5, M5, None, M5, M5, None], R.AUTOMATIC_NO_SLOT, NO_SLOT_MESSAGE, id="four-spread"
    ),
]


@pytest.mark.parametrize(("tier", "tiers", "reason", "message"), NOT_PLACED)
def test_place_automatic_rejects(
    tier: Tier, tiers: list[Tier | None], reason: R, message: str
) -> None:
    with pytest.raises(MarkerError) as caught:
        place_automatic(tier, tiers)
    assert caught.value.reason is reason
    assert caught.value.message == message


def test_automatic_messages_are_the_references() -> None:
    assert CONFLICT_MESSAGE == (
        "top-level cache_control ttl conflicts with the explicit cache_control on the last block"
    )
    assert NO_SLOT_MESSAGE == (
        "no breakpoint slot left for automatic caching (all 4 used by explicit markers)"
    )


ENVELOPES = [
    pytest.param(
        MarkerError(R.INVALID_TTL, 'invalid cache_control ttl: "é/x"'),
        b'{"error":{"message":"invalid cache_control ttl: \\"\xc3\xa9/x\\"",'
        b'"type":"invalid_request_error","code":"invalid_cache_control","param":"cache_control"}}',
        id="marker-error",
    ),
    pytest.param(
        MarkerError(R.MALFORMED, MALFORMED),
        b'{"error":{"message":"cache_control must be an object with a string \\"type\\": '
        b'\\"ephemeral\\" (and an optional string \\"ttl\\")","type":"invalid_request_error",'
        b'"code":"invalid_cache_control","param":"cache_control"}}',
        id="malformed",
    ),
    pytest.param(
        BreakpointParamError('invalid cacheBreakpoint value ""; supported values: "x"'),
        b'{"error":{"message":"invalid cacheBreakpoint value \\"\\"; supported values: \\"x\\"",'
        b'"type":"invalid_request_error","code":"invalid_cache_breakpoint",'
        b'"param":"cacheBreakpoint"}}',
        id="breakpoint-param",
    ),
    pytest.param(
        BodyReadError("body too large"),
        b'{"error":{"message":"body too large","type":"invalid_request_error",'
        b'"code":"body_read_failed","param":null}}',
        id="body-read-failed",
    ),
    pytest.param(
        BodyReadError("unreadable", R.UNREADABLE_BODY),
        b'{"error":{"message":"unreadable","type":"invalid_request_error",'
        b'"code":"unreadable_body","param":null}}',
        id="unreadable-body",
    ),
]


@pytest.mark.parametrize(("err", "expected"), ENVELOPES)
def test_error_envelope(err: ClientError, expected: bytes) -> None:
    assert error_envelope(err) == expected
