"""Tests for splicing the cache split into usage objects and whole JSON bodies."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.core import codec
from extproc.core.model import Split, Tier
from extproc.core.usage import (
    JsonBodyEdit,
    edit_json_body,
    inject_usage,
)

SPLIT = Split(read=1500, creation={Tier.M5: 300, Tier.H24: 100})
CACHE_FIELDS: dict[str, Any] = {
    "cache_read_input_tokens": 1500,
    "cache_creation_input_tokens": 400,
    "cache_creation": {
        "ephemeral_5m_input_tokens": 300,
        "ephemeral_1h_input_tokens": 0,
        "ephemeral_24h_input_tokens": 100,
    },
}
ZERO_FIELDS: dict[str, Any] = {
    "prompt_tokens_details": {"cached_tokens": 0},
    "cache_read_input_tokens": 0,
    "cache_creation_input_tokens": 0,
    "cache_creation": {
        "ephemeral_5m_input_tokens": 0,
        "ephemeral_1h_input_tokens": 0,
        "ephemeral_24h_input_tokens": 0,
    },
}
BASE = {"prompt_tokens": 2000, "completion_tokens": 2, "total_tokens": 2002}


def with_fields(usage: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    return {**usage, "prompt_tokens_details": details, **CACHE_FIELDS}


INJECT_VALID = [
    pytest.param(BASE, SPLIT, with_fields(BASE, {"cached_tokens": 1500}), id="plain-usage"),
    pytest.param(
        {**BASE, "prompt_tokens_details": None},
        SPLIT,
        with_fields(BASE, {"cached_tokens": 1500}),
        id="details-null",
    ),
    pytest.param(
        {**BASE, "prompt_tokens_details": {"audio_tokens": 3, "cached_tokens": 9}},
        SPLIT,
        with_fields(BASE, {"audio_tokens": 3, "cached_tokens": 1500}),
        id="details-other-keys-kept",
    ),
    pytest.param(
        {**BASE, "prompt_tokens_details": [1]},
        SPLIT,
        with_fields(BASE, {"cached_tokens": 1500}),
        id="details-not-object-replaced",
    ),
    pytest.param(
        {**BASE, "reasoning_tokens": 7, "cache_read_input_tokens": 99, "cache_creation": {"x": 1}},
        SPLIT,
        {**with_fields(BASE, {"cached_tokens": 1500}), "reasoning_tokens": 7},
        id="provider-cache-fields-overwritten-others-kept",
    ),
    pytest.param(BASE, Split(), {**BASE, **ZERO_FIELDS}, id="zero-split"),
    pytest.param({}, SPLIT, with_fields({}, {"cached_tokens": 1500}), id="empty-usage"),
]


@pytest.mark.parametrize(("usage", "split", "expected"), INJECT_VALID)
def test_inject_usage(usage: dict[str, Any], split: Split, expected: dict[str, Any]) -> None:
    before = copy.deepcopy(usage)
    assert inject_usage(usage, split) == expected
    assert usage == before  # never mutated


def body(doc: Any) -> bytes:
    return codec.dumps(doc)


EDIT_VALID = [
    pytest.param(
        body({"id": "c1", "usage": BASE}),
        SPLIT,
        {"id": "c1", "usage": with_fields(BASE, {"cached_tokens": 1500})},
        JsonBodyEdit(b"", usage_seen=True),
        id="active",
    ),
    pytest.param(
        body({"usage": BASE, "choices": [{"message": {"content": "é/ü"}}]}),
        Split(),
        {"usage": {**BASE, **ZERO_FIELDS}, "choices": [{"message": {"content": "é/ü"}}]},
        JsonBodyEdit(b"", usage_seen=True),
        id="zero-active-keeps-rest",
    ),
    pytest.param(
        body({"usage": BASE}),
        Split(read=3000),
        {
            "usage": with_fields(BASE, {"cached_tokens": 3000})
            | {
                "cache_read_input_tokens": 3000,
                "cache_creation_input_tokens": 0,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 0,
                    "ephemeral_1h_input_tokens": 0,
                    "ephemeral_24h_input_tokens": 0,
                },
            }
        },
        JsonBodyEdit(b"", usage_seen=True),
        id="split-shown-as-computed-even-above-prompt-tokens",
    ),
    pytest.param(
        body({"usage": BASE, "error": {"message": "x"}}),
        SPLIT,
        {"usage": with_fields(BASE, {"cached_tokens": 1500}), "error": {"message": "x"}},
        JsonBodyEdit(b"", usage_seen=True, error_seen=True),
        id="error-and-usage",
    ),
]


@pytest.mark.parametrize(("raw", "split", "expected_doc", "facts"), EDIT_VALID)
def test_edit_json_body(raw: bytes, split: Split, expected_doc: Any, facts: JsonBodyEdit) -> None:
    edit = edit_json_body(raw, split)
    assert codec.loads(edit.body) == expected_doc
    assert (edit.usage_seen, edit.error_seen) == (facts.usage_seen, facts.error_seen)


EDIT_UNTOUCHED = [
    pytest.param(b"{not json", SPLIT, JsonBodyEdit(b""), id="malformed"),
    pytest.param(b"", SPLIT, JsonBodyEdit(b""), id="empty"),
    pytest.param(b'[{"usage":{}}]', SPLIT, JsonBodyEdit(b""), id="array"),
    pytest.param(b'"usage"', SPLIT, JsonBodyEdit(b""), id="string"),
    pytest.param(b'{"usage":null}', SPLIT, JsonBodyEdit(b""), id="usage-null"),
    pytest.param(b'{"usage":[1]}', SPLIT, JsonBodyEdit(b""), id="usage-not-object"),
    pytest.param(b'{"id":"c"}', SPLIT, JsonBodyEdit(b""), id="no-usage"),
    pytest.param(
        b'{"usage": {"prompt_tokens": 3}}',
        None,
        JsonBodyEdit(b"", usage_seen=True),
        id="inactive-still-reports-usage",
    ),
    pytest.param(
        b'{"error":{"message":"bad","type":"invalid_request_error"}}',
        SPLIT,
        JsonBodyEdit(b"", error_seen=True),
        id="error-object",
    ),
    pytest.param(
        b'{"object":"error","message":"bad","code":400}',
        None,
        JsonBodyEdit(b"", error_seen=True),
        id="error-envelope-object-error",
    ),
    pytest.param(b'{"error":"a string"}', SPLIT, JsonBodyEdit(b""), id="error-string-not-error"),
    pytest.param(
        body({"usage": {**BASE, **ZERO_FIELDS}}),
        Split(),
        JsonBodyEdit(b"", usage_seen=True),
        id="already-injected",
    ),
]


@pytest.mark.parametrize(("raw", "split", "facts"), EDIT_UNTOUCHED)
def test_edit_json_body_untouched(raw: bytes, split: Split | None, facts: JsonBodyEdit) -> None:
    edit = edit_json_body(raw, split)
    assert edit.body is raw
    assert (edit.usage_seen, edit.error_seen) == (facts.usage_seen, facts.error_seen)


def test_edit_json_body_is_idempotent() -> None:
    once = edit_json_body(body({"usage": BASE, "id": "x"}), SPLIT).body
    again = edit_json_body(once, SPLIT)
    assert again.body is once


json_leaf = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
usages = st.dictionaries(st.text(max_size=12), json_value, max_size=6).flatmap(
    lambda extra: st.fixed_dictionaries(
        {"prompt_tokens": st.integers(0, 10**6) | json_value},
        optional={"prompt_tokens_details": st.none() | json_value},
    ).map(lambda fixed: {**extra, **fixed})
)
counts = st.integers(-5, 10**6)
splits = st.builds(
    Split, read=counts, creation=st.dictionaries(st.sampled_from(list(Tier)), counts)
)


@given(usage=usages, split=splits)
def test_inject_is_idempotent_and_keeps_json_valid(usage: dict[str, Any], split: Split) -> None:
    once = inject_usage(usage, split)
    assert inject_usage(once, split) == once
    assert codec.loads(codec.dumps(once)) == once
    assert once["prompt_tokens"] == usage["prompt_tokens"]
    owned = {"prompt_tokens_details", *CACHE_FIELDS}
    assert {k: v for k, v in once.items() if k not in owned} == {
        k: v for k, v in usage.items() if k not in owned
    }
