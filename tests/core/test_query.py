"""The ``cacheBreakpoint`` query parameter of a chat route (DESIGN §3.0.1)."""

from __future__ import annotations

import pytest

from extproc.core.errors import BreakpointParamError, ClientError, RejectReason
from extproc.core.markers import error_envelope
from extproc.core.query import BreakpointParam, read_breakpoint_param

CHAT = "/v1/chat/completions"

ABSENT = [
    pytest.param(CHAT, id="no-query"),
    pytest.param(CHAT + "?", id="empty-query"),
    pytest.param(CHAT + "?a=1&b=2", id="other-parameters"),
    pytest.param(CHAT + "?cachebreakpoint=lastUserMessage", id="name-is-case-sensitive"),
    pytest.param(CHAT + "?CacheBreakpoint=x", id="name-capitalised"),
    pytest.param(CHAT + "?cache%42reakpoint=lastUserMessage", id="name-not-percent-decoded"),
    pytest.param(CHAT + "?x=cacheBreakpoint", id="name-as-a-value"),
    pytest.param(CHAT + "?xcacheBreakpoint=lastUserMessage", id="longer-name"),
    pytest.param(CHAT + "?cacheBreakpointx=lastUserMessage", id="name-with-suffix"),
    pytest.param("/v1/cacheBreakpoint=lastUserMessage", id="in-the-path-not-the-query"),
]


@pytest.mark.parametrize("path", ABSENT)
def test_no_parameter(path: str) -> None:
    assert read_breakpoint_param(path) is None


VALID = [
    pytest.param(CHAT + "?cacheBreakpoint=lastUserMessage", CHAT, id="only-parameter"),
    pytest.param(
        CHAT + "?a=1&cacheBreakpoint=lastUserMessage&b=2", CHAT + "?a=1&b=2", id="in-the-middle"
    ),
    pytest.param(CHAT + "?cacheBreakpoint=lastUserMessage&b=2", CHAT + "?b=2", id="first"),
    pytest.param(CHAT + "?a=1&cacheBreakpoint=lastUserMessage", CHAT + "?a=1", id="last"),
    pytest.param(
        CHAT + "?cacheBreakpoint=lastUserMessage&cacheBreakpoint=bogus",
        CHAT,
        id="first-occurrence-decides-every-one-removed",
    ),
    pytest.param(
        CHAT + "?z=%20&cacheBreakpoint=lastUserMessage&a&cacheBreakpoint=&m=x=y",
        CHAT + "?z=%20&a&m=x=y",
        id="others-keep-order-and-spelling",
    ),
    pytest.param(CHAT + "?cacheBreakpoint=lastUserMessage&", CHAT, id="trailing-ampersand"),
    pytest.param(CHAT + "?&&cacheBreakpoint=lastUserMessage", CHAT, id="only-empty-others"),
    pytest.param(
        CHAT + "?&a=1&&cacheBreakpoint=lastUserMessage", CHAT + "?&a=1&", id="empty-ones-kept"
    ),
    pytest.param(
        "/openai/v1/chat/completions?cacheBreakpoint=lastUserMessage",
        "/openai/v1/chat/completions",
        id="prefixed-route",
    ),
]


@pytest.mark.parametrize(("path", "forwarded"), VALID)
def test_parameter_read_and_removed(path: str, forwarded: str) -> None:
    assert read_breakpoint_param(path) == BreakpointParam(forwarded)


REJECTED = [
    pytest.param(CHAT + "?cacheBreakpoint=", "", id="empty-value"),
    pytest.param(CHAT + "?cacheBreakpoint", "", id="no-equals-sign"),
    pytest.param(CHAT + "?cacheBreakpoint=lastusermessage", "lastusermessage", id="value-case"),
    pytest.param(CHAT + "?cacheBreakpoint=last%55serMessage", "last%55serMessage", id="raw"),
    pytest.param(CHAT + "?cacheBreakpoint=lastUserMessage%20", "lastUserMessage%20", id="pad"),
    pytest.param(CHAT + "?cacheBreakpoint=allMessages", "allMessages", id="other-value"),
    pytest.param(
        CHAT + "?cacheBreakpoint=x&cacheBreakpoint=lastUserMessage", "x", id="first-decides"
    ),
    pytest.param(CHAT + "?a=1&cacheBreakpoint=none", "none", id="after-another"),
    pytest.param(
        CHAT + "?cacheBreakpoint=lastUserMessage=1", "lastUserMessage=1", id="equals-in-value"
    ),
]


@pytest.mark.parametrize(("path", "raw"), REJECTED)
def test_unsupported_value(path: str, raw: str) -> None:
    with pytest.raises(BreakpointParamError) as caught:
        read_breakpoint_param(path)
    err = caught.value
    assert isinstance(err, ClientError)
    assert err.message == (
        f'invalid cacheBreakpoint value "{raw}"; supported values: "lastUserMessage"'
    )
    assert str(err) == err.message
    assert err.reason is RejectReason.INVALID_CACHE_BREAKPOINT
    assert (err.code, err.param) == ("invalid_cache_breakpoint", "cacheBreakpoint")


def test_unsupported_value_envelope() -> None:
    with pytest.raises(BreakpointParamError) as caught:
        read_breakpoint_param(CHAT + "?cacheBreakpoint=all")
    assert error_envelope(caught.value) == (
        b'{"error":{"message":"invalid cacheBreakpoint value \\"all\\"; supported values: '
        b'\\"lastUserMessage\\"","type":"invalid_request_error",'
        b'"code":"invalid_cache_breakpoint","param":"cacheBreakpoint"}}'
    )
