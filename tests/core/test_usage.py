"""The cache fields of a response ``usage``: scrub, inject, cap, engine read (DESIGN §4.3).

Whole JSON bodies are edited by splicing: an edited body differs from the original only
inside its ``usage`` value, and a body with nothing to change is the very same bytes.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.core import codec, spans
from extproc.core.codec import Literal
from extproc.core.model import Classification, Outcome, Split, Tier
from extproc.core.usage import (
    PROVIDER_FIELDS,
    JsonBodyEdit,
    UsageRule,
    _edit_walked,
    capped,
    edit_document,
    edit_json_body,
    edit_usage,
    engine_split,
    inject_usage,
    scrub_usage,
)

SPLIT = Split(read=1500, creation={Tier.M5: 300, Tier.H24: 100})
BASE: dict[str, Any] = {"prompt_tokens": 2000, "completion_tokens": 2, "total_tokens": 2002}
INACTIVE = UsageRule()
ACTIVE = UsageRule(SPLIT)


def ours(read: int, m5: int = 0, h1: int = 0, h24: int = 0) -> dict[str, Any]:
    """The cache fields this sidecar writes, ``prompt_tokens_details`` aside."""
    return {
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": m5 + h1 + h24,
        "cache_creation": {
            "ephemeral_5m_input_tokens": m5,
            "ephemeral_1h_input_tokens": h1,
            "ephemeral_24h_input_tokens": h24,
        },
    }


PROVIDER: dict[str, Any] = {
    "cache_read_input_tokens": 7,
    "cache_creation_input_tokens": 3,
    "cache_creation": {"ephemeral_5m_input_tokens": 3},
    "prompt_cache_hit_tokens": 7,
    "prompt_cache_miss_tokens": 1993,
    "cache_discount": 0.5,
}


def test_the_provider_fields_are_the_designs() -> None:
    assert set(PROVIDER_FIELDS) == set(PROVIDER)


SCRUBBED = [
    *[
        pytest.param({**BASE, name: PROVIDER[name]}, BASE, id=f"{name}-removed")
        for name in PROVIDER_FIELDS
    ],
    pytest.param({**BASE, **PROVIDER}, BASE, id="all-removed"),
    pytest.param(
        {**BASE, "prompt_tokens_details": {"cached_tokens": 768, "audio_tokens": 2}},
        {**BASE, "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 2}},
        id="cached-tokens-zeroed-other-details-kept",
    ),
    pytest.param(
        {**BASE, "prompt_tokens_details": {"cached_tokens": "5"}},
        {**BASE, "prompt_tokens_details": {"cached_tokens": 0}},
        id="cached-tokens-not-a-number-zeroed",
    ),
    pytest.param(
        {"x": Literal("1e400"), "cache_discount": Literal("NaN")},
        {"x": Literal("1e400")},
        id="literals-kept",
    ),
]


@pytest.mark.parametrize(("usage", "expected"), SCRUBBED)
def test_inactive_usage_is_scrubbed(usage: dict[str, Any], expected: dict[str, Any]) -> None:
    before = copy.deepcopy(usage)
    assert edit_usage(usage, INACTIVE) == expected
    assert scrub_usage(usage) == expected
    assert usage == before  # never mutated


NOTHING_TO_SCRUB = [
    pytest.param(BASE, id="plain"),
    pytest.param({}, id="empty"),
    pytest.param({**BASE, "prompt_tokens_details": {"cached_tokens": 0}}, id="zero-cached"),
    pytest.param({**BASE, "prompt_tokens_details": {"cached_tokens": None}}, id="null-cached"),
    pytest.param({**BASE, "prompt_tokens_details": None}, id="details-null"),
    pytest.param({**BASE, "prompt_tokens_details": [768]}, id="details-not-an-object"),
    pytest.param({**BASE, "created_cache_tokens": 5}, id="other-keys-are-not-ours"),
]


@pytest.mark.parametrize("usage", NOTHING_TO_SCRUB)
def test_nothing_to_scrub(usage: dict[str, Any]) -> None:
    assert edit_usage(usage, INACTIVE) is None
    assert scrub_usage(usage) is None


@pytest.mark.parametrize("usage", [pytest.param({**BASE, **PROVIDER}, id="provider-fields")])
def test_scrubbing_off_leaves_inactive_usage(usage: dict[str, Any]) -> None:
    assert edit_usage(usage, UsageRule(scrub=False)) is None


INJECTED = [
    pytest.param(
        BASE,
        SPLIT,
        {**BASE, "prompt_tokens_details": {"cached_tokens": 1500}, **ours(1500, 300, 0, 100)},
        id="plain",
    ),
    pytest.param(
        {**BASE, "prompt_tokens_details": None},
        SPLIT,
        {**BASE, "prompt_tokens_details": {"cached_tokens": 1500}, **ours(1500, 300, 0, 100)},
        id="details-null",
    ),
    pytest.param(
        {"prompt_tokens_details": {"audio_tokens": 3, "cached_tokens": 9}, **BASE},
        SPLIT,
        {
            "prompt_tokens_details": {"audio_tokens": 3, "cached_tokens": 1500},
            **BASE,
            **ours(1500, 300, 0, 100),
        },
        id="details-other-keys-kept-in-place",
    ),
    pytest.param(
        {**BASE, "prompt_tokens_details": [1]},
        SPLIT,
        {**BASE, "prompt_tokens_details": {"cached_tokens": 1500}, **ours(1500, 300, 0, 100)},
        id="details-not-an-object-replaced",
    ),
    pytest.param(
        {**BASE, "reasoning_tokens": 7, **PROVIDER},
        SPLIT,
        {
            **BASE,
            "reasoning_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 1500},
            **ours(1500, 300, 0, 100),
        },
        id="provider-fields-replaced-by-ours",
    ),
    pytest.param(
        BASE, Split(), {**BASE, "prompt_tokens_details": {"cached_tokens": 0}, **ours(0)}, id="zero"
    ),
    pytest.param(
        {},
        SPLIT,
        {"prompt_tokens_details": {"cached_tokens": 1500}, **ours(1500, 300, 0, 100)},
        id="empty-usage-no-cap",
    ),
]


@pytest.mark.parametrize(("usage", "split", "expected"), INJECTED)
def test_active_usage_gets_our_split(
    usage: dict[str, Any], split: Split, expected: dict[str, Any]
) -> None:
    before = copy.deepcopy(usage)
    edited = edit_usage(usage, UsageRule(split))
    assert edited == expected
    assert edited is not None
    assert list(edited) == list(expected)  # key order: kept keys in place, ours appended
    assert usage == before


def test_injecting_the_same_split_again_changes_nothing() -> None:
    once = edit_usage(BASE, ACTIVE)
    assert once is not None
    assert edit_usage(once, ACTIVE) is None
    assert inject_usage(once, SPLIT) == once


CAPS = [
    pytest.param(Split(read=5, creation={Tier.M5: 5}), 10, Split(5, {Tier.M5: 5}), id="exact"),
    pytest.param(
        Split(read=8, creation={Tier.M5: 5}), 10, Split(5, {Tier.M5: 5}), id="read-shrinks"
    ),
    pytest.param(
        Split(read=8, creation={Tier.M5: 6, Tier.H1: 4}),
        10,
        Split(0, {Tier.M5: 6, Tier.H1: 4}),
        id="read-shrinks-to-zero",
    ),
    pytest.param(Split(read=0, creation={Tier.H1: 11}), 10, Split(), id="creation-alone-too-big"),
    pytest.param(Split(read=20), 10, Split(read=10), id="read-alone-too-big"),
    pytest.param(Split(read=3), 0, Split(), id="zero-prompt"),
    pytest.param(Split(read=20), None, Split(read=20), id="no-prompt-tokens"),
    pytest.param(Split(read=20), "10", Split(read=20), id="prompt-tokens-a-string"),
    pytest.param(Split(read=20), 10.0, Split(read=20), id="prompt-tokens-a-float"),
    pytest.param(Split(read=20), True, Split(read=20), id="prompt-tokens-a-bool"),
    pytest.param(Split(read=20), -1, Split(read=20), id="prompt-tokens-negative"),
    pytest.param(Split(read=20), Literal("1e400"), Split(read=20), id="prompt-tokens-a-literal"),
]


@pytest.mark.parametrize(("split", "prompt_tokens", "expected"), CAPS)
def test_never_more_cached_than_prompted(
    split: Split, prompt_tokens: object, expected: Split
) -> None:
    assert capped(split, prompt_tokens) == expected


def test_the_cap_applies_to_the_injected_usage() -> None:
    usage = {"prompt_tokens": 100}
    edited = edit_usage(usage, UsageRule(Split(read=90, creation={Tier.M5: 30})))
    assert edited == {
        "prompt_tokens": 100,
        "prompt_tokens_details": {"cached_tokens": 70},
        **ours(70, 30),
    }
    assert edit_usage(usage, UsageRule(Split(read=1, creation={Tier.M5: 101}))) == {
        "prompt_tokens": 100,
        "prompt_tokens_details": {"cached_tokens": 0},
        **ours(0),
    }


ENGINE = UsageRule(Split(), engine=True)
ENGINE_READS = [
    pytest.param({**BASE, "prompt_tokens_details": {"cached_tokens": 768}}, 768, id="read"),
    pytest.param({**BASE, "prompt_tokens_details": {"cached_tokens": 5000}}, 2000, id="capped"),
    pytest.param(BASE, 0, id="no-details"),
    pytest.param({**BASE, "prompt_tokens_details": {"cached_tokens": "768"}}, 0, id="not-a-count"),
    pytest.param({**BASE, "prompt_tokens_details": {"cached_tokens": -3}}, 0, id="negative"),
    pytest.param({**BASE, "prompt_tokens_details": {"cached_tokens": True}}, 0, id="bool"),
    pytest.param(
        {**BASE, "prompt_tokens_details": {"cached_tokens": 768}, **PROVIDER},
        768,
        id="provider-fields-replaced",
    ),
]


@pytest.mark.parametrize(("usage", "read"), ENGINE_READS)
def test_engine_read(usage: dict[str, Any], read: int) -> None:
    edited = edit_usage(usage, ENGINE)
    assert edited is not None
    assert edited["prompt_tokens_details"]["cached_tokens"] == read
    assert {k: edited[k] for k in ours(0)} == ours(read)
    assert not set(PROVIDER_FIELDS) - set(ours(0)) & set(edited)


def test_engine_split_has_no_creation() -> None:
    assert engine_split({"prompt_tokens_details": {"cached_tokens": 9}}) == Split(read=9)


RULES = [
    pytest.param(None, True, UsageRule(None, scrub=True), id="not-known-yet"),
    pytest.param(Classification.inactive("no_bearer"), False, UsageRule(scrub=False), id="off"),
    pytest.param(Classification.zero("below_floor", "m"), True, UsageRule(Split()), id="zero"),
    pytest.param(
        Classification(Outcome.READ, split=SPLIT, model="m"), True, UsageRule(SPLIT), id="read"
    ),
    pytest.param(
        Classification.engine_read("m"), True, UsageRule(Split(), engine=True), id="engine"
    ),
]


@pytest.mark.parametrize(("classification", "scrub", "rule"), RULES)
def test_rule_of_a_classification(
    classification: Classification | None, scrub: bool, rule: UsageRule
) -> None:
    assert UsageRule.of(classification, scrub) == rule


# ---- whole JSON bodies ----


def _usage_span(raw: bytes) -> tuple[int, int]:
    text = spans.decode(raw)
    usage = spans.read(text, spans.SHALLOW).get("usage")
    assert usage is not None
    return len(spans.encode(text[: usage.start])), len(spans.encode(text[: usage.end]))


def assert_only_usage_changed(before: bytes, after: bytes) -> None:
    start, end = _usage_span(before)
    start_after, end_after = _usage_span(after)
    assert start_after == start
    assert after[:start] == before[:start]
    assert after[end_after:] == before[end:]


BODY = (
    '{"id":"chatcmpl-1", "choices":[{"message":{"content":"\\u00e9/\udcff"}}],\n'
    ' "n":1e400, "usage" : {"prompt_tokens":2000,"x":NaN,"big":1180591620717411303424%s} }\n'
)
EDITED_BODIES = [
    pytest.param(
        BODY % ',"cache_discount":0.5,"prompt_cache_hit_tokens":1',
        INACTIVE,
        '{"prompt_tokens":2000,"x":NaN,"big":1180591620717411303424}',
        id="scrubbed",
    ),
    pytest.param(
        BODY % "",
        UsageRule(Split(read=3)),
        '{"prompt_tokens":2000,"x":NaN,"big":1180591620717411303424,'
        '"prompt_tokens_details":{"cached_tokens":3},"cache_read_input_tokens":3,'
        '"cache_creation_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,'
        '"ephemeral_1h_input_tokens":0,"ephemeral_24h_input_tokens":0}}',
        id="injected",
    ),
]


@pytest.mark.parametrize(("body", "rule", "usage"), EDITED_BODIES)
def test_edited_body_differs_only_inside_usage(body: str, rule: UsageRule, usage: str) -> None:
    raw = spans.encode(body)
    edit = edit_json_body(raw, rule)
    assert edit.body == spans.encode(body.split('"usage" : ')[0] + '"usage" : ' + usage + " }\n")
    assert_only_usage_changed(raw, edit.body)
    assert (edit.usage_seen, edit.error_seen) == (True, False)


ACTIVE_BODY = codec.dumps({"id": "c1", "usage": BASE})
UNTOUCHED = [
    pytest.param(b"{not json", ACTIVE, JsonBodyEdit(b""), id="malformed"),
    pytest.param(b"", ACTIVE, JsonBodyEdit(b""), id="empty"),
    pytest.param(b'[{"usage":{}}]', ACTIVE, JsonBodyEdit(b""), id="array"),
    pytest.param(b'"usage"', ACTIVE, JsonBodyEdit(b""), id="string"),
    pytest.param(b'{"usage":null}', ACTIVE, JsonBodyEdit(b""), id="usage-null"),
    pytest.param(b'{"usage":[1]}', ACTIVE, JsonBodyEdit(b""), id="usage-not-an-object"),
    pytest.param(b'{"id":"c"}', ACTIVE, JsonBodyEdit(b""), id="no-usage"),
    pytest.param(
        b'{"usage": {"prompt_tokens": 3}}',
        INACTIVE,
        JsonBodyEdit(b"", usage_seen=True),
        id="inactive-nothing-to-scrub",
    ),
    pytest.param(
        codec.dumps({"usage": {**BASE, **PROVIDER}}),
        UsageRule(scrub=False),
        JsonBodyEdit(b"", usage_seen=True),
        id="scrubbing-off",
    ),
    pytest.param(
        b'{"error":{"message":"bad","type":"invalid_request_error"}}',
        ACTIVE,
        JsonBodyEdit(b"", error_seen=True),
        id="error-object",
    ),
    pytest.param(
        b'{"object":"error","message":"bad","code":400}',
        INACTIVE,
        JsonBodyEdit(b"", error_seen=True),
        id="error-envelope-object-error",
    ),
    pytest.param(b'{"error":"a string"}', ACTIVE, JsonBodyEdit(b""), id="error-string-not-error"),
    pytest.param(
        edit_json_body(ACTIVE_BODY, ACTIVE).body,
        ACTIVE,
        JsonBodyEdit(b"", usage_seen=True),
        id="already-edited",
    ),
]


@pytest.mark.parametrize(("raw", "rule", "facts"), UNTOUCHED)
def test_body_with_nothing_to_change_is_the_same_bytes(
    raw: bytes, rule: UsageRule, facts: JsonBodyEdit
) -> None:
    edit = edit_json_body(raw, rule)
    assert edit.body is raw
    assert (edit.usage_seen, edit.error_seen) == (facts.usage_seen, facts.error_seen)


def test_error_with_usage_is_edited_and_reported() -> None:
    raw = codec.dumps({"usage": BASE, "error": {"message": "x"}})
    edit = edit_json_body(raw, ACTIVE)
    assert (edit.usage_seen, edit.error_seen) == (True, True)
    assert codec.loads(edit.body)["usage"]["cache_read_input_tokens"] == 1500


# ---- properties ----

json_leaf = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
counts = st.integers(0, 10**6)
usages = st.fixed_dictionaries(
    {"prompt_tokens": counts | json_value},
    optional={
        "prompt_tokens_details": st.none()
        | json_value
        | st.fixed_dictionaries({"cached_tokens": counts | json_value}),
        **dict.fromkeys(PROVIDER_FIELDS, counts | json_value),
        "completion_tokens": counts,
    },
)
splits = st.builds(
    Split, read=counts, creation=st.dictionaries(st.sampled_from(list(Tier)), counts)
)
rules = st.builds(UsageRule, split=st.none() | splits, engine=st.booleans(), scrub=st.booleans())


@given(usages, rules)
def test_edit_is_idempotent_and_keeps_what_it_does_not_own(
    usage: dict[str, Any], rule: UsageRule
) -> None:
    before = copy.deepcopy(usage)
    once = edit_usage(usage, rule)
    assert usage == before
    result = usage if once is None else once
    assert edit_usage(result, rule) is None
    owned = {"prompt_tokens_details", *PROVIDER_FIELDS}
    assert {k: v for k, v in result.items() if k not in owned} == {
        k: v for k, v in usage.items() if k not in owned
    }
    if rule.split is None and rule.scrub:
        assert not set(PROVIDER_FIELDS) & set(result)


@given(usages, splits, st.booleans())
def test_never_more_cached_than_prompted_property(
    usage: dict[str, Any], split: Split, engine: bool
) -> None:
    edited = edit_usage(usage, UsageRule(split, engine))
    result = usage if edited is None else edited
    prompt = usage["prompt_tokens"]
    read, creation = result["cache_read_input_tokens"], result["cache_creation_input_tokens"]
    assert result["prompt_tokens_details"]["cached_tokens"] == read
    assert creation == sum(result["cache_creation"].values())
    if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0:
        assert read + creation <= prompt
    if engine:
        assert creation == 0


members = st.lists(
    st.tuples(st.sampled_from(["id", "choices", "model", "n"]), json_value), max_size=4
)
spacing = st.sampled_from(["", " ", "\n  ", "\t"])


@settings(max_examples=200)
@given(members, members, usages, rules, spacing)
def test_body_edit_touches_only_the_usage_value(
    before: list[tuple[str, Any]],
    after: list[tuple[str, Any]],
    usage: dict[str, Any],
    rule: UsageRule,
    ws: str,
) -> None:
    parts = [f"{codec.dumps(k).decode()}:{ws}{codec.dumps(v).decode()}" for k, v in before]
    parts.append(f'"usage"{ws}:{ws}{codec.dumps(usage).decode()}')
    parts += [f"{codec.dumps(k).decode()}:{codec.dumps(v).decode()}" for k, v in after]
    raw = ("{" + ws + f",{ws}".join(parts) + ws + "}").encode()
    edit = edit_json_body(raw, rule)
    assert edit.usage_seen
    if edit_usage(usage, rule) is None:
        assert edit.body is raw
    else:
        assert_only_usage_changed(raw, edit.body)
        assert codec.loads(edit.body)["usage"] == edit_usage(usage, rule)


@settings(max_examples=200)
@given(members, usages, rules, st.booleans())
def test_reading_with_orjson_first_decides_as_the_walk_does(
    before: list[tuple[str, Any]], usage: dict[str, Any], rule: UsageRule, huge: bool
) -> None:
    parts = [f"{codec.dumps(k).decode()}:{codec.dumps(v).decode()}" for k, v in before]
    if huge:  # orjson refuses it: the lossless walk reads the document
        parts.append('"n":' + "9" * 40)
    parts.append(f'"usage":{codec.dumps(usage).decode()}')
    text = "{" + ",".join(parts) + "}"
    assert edit_document(text, rule) == _edit_walked(text, rule)
