"""Through Envoy and the real server: writes, reads, the 400s, and what passes untouched."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.core import codec
from tests.e2e.chat import (
    CHAT,
    DOCUMENT,
    SYSTEM,
    Answer,
    cache_fields,
    cached_request,
    event_json,
    exchange,
    marker,
    send,
    split_events,
    tag,
    text,
    usage_events,
    usage_of,
    wait_for_read,
)
from tests.plugins.stack import Stack

pytestmark = pytest.mark.e2e


def _counts(stack: Stack) -> tuple[int, int]:
    if stack.tokenizer is None:
        pytest.skip("needs the suite's own tokenizer to know the real counts")
    system, document = stack.tokenizer.count("demo", [SYSTEM, DOCUMENT])
    return system, document


def _without_markers(body: dict[str, Any]) -> dict[str, Any]:
    out = codec.loads(codec.dumps(body))
    for message in out["messages"]:
        for block in message["content"] if isinstance(message["content"], list) else []:
            block.pop("cache_control", None)
    return out


@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_first_request_writes_and_the_second_reads(stack: Stack, streamed: bool) -> None:
    system, document = _counts(stack)
    key = stack.new_key()
    body = cached_request(stream=streamed)

    first = usage_of(send(stack, body, key), streamed)
    second = wait_for_read(stack, body, key)

    assert first["prompt_tokens"] == second["prompt_tokens"] == Answer().prompt_tokens
    assert cache_fields(first) == {
        "read": 0,
        "created": system + document,
        "cached_tokens": 0,
        "5m": document,
        "1h": system,
        "24h": 0,
    }
    assert cache_fields(second) == {
        "read": system + document,
        "created": 0,
        "cached_tokens": system + document,
        "5m": 0,
        "1h": 0,
        "24h": 0,
    }


def test_a_longer_prompt_reads_the_prefix_and_writes_the_rest(stack: Stack) -> None:
    system, _ = _counts(stack)
    key = stack.new_key()
    short = {"model": "demo", "messages": [{"role": "system", "content": [text(SYSTEM, marker())]}]}
    send(stack, short, key)
    wait_for_read(stack, short, key)

    usage = usage_of(send(stack, cached_request(), key), streamed=False)

    assert usage["cache_read_input_tokens"] == system
    assert (
        usage["cache_creation"]["ephemeral_5m_input_tokens"] == usage["cache_creation_input_tokens"]
    )
    assert usage["cache_creation_input_tokens"] > 0


def test_principals_never_share_entries(stack: Stack) -> None:
    body = cached_request()
    owner = stack.new_key()
    send(stack, body, owner)
    wait_for_read(stack, body, owner)

    stranger = usage_of(send(stack, body, stack.new_key()), streamed=False)

    assert stranger["cache_read_input_tokens"] == 0
    assert stranger["cache_creation_input_tokens"] > 0


@pytest.mark.parametrize(
    "streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse-no-stream-options")]
)
def test_forwarded_body_has_no_markers_and_streams_carry_usage(
    stack: Stack, streamed: bool
) -> None:
    body = cached_request(stream=streamed, temperature=0.2)
    result = send(stack, body, stack.new_key())

    assert result.upstream_body is not None
    forwarded = codec.loads(result.upstream_body)
    expected = _without_markers(body)
    if streamed:
        expected["stream_options"] = {"include_usage": True}
    assert forwarded == expected
    assert b"cache_control" not in result.upstream_body


def test_stream_options_are_kept_and_include_usage_forced(stack: Stack) -> None:
    body = cached_request(stream=True, stream_options={"include_usage": False, "x": 1})
    result = send(stack, body, stack.new_key())

    assert result.upstream_body is not None
    assert codec.loads(result.upstream_body)["stream_options"] == {"include_usage": True, "x": 1}


SPLITS = [
    pytest.param(Answer(), id="one-frame-per-chunk"),
    # Small pauses so Envoy reads (and the server gets) the pieces as separate chunks.
    pytest.param(Answer(split="awkward", chunk_delay_ms=5), id="split-inside-data-and-usage"),
    pytest.param(
        Answer(split="awkward", crlf=True, chunk_delay_ms=5), id="crlf-split-between-cr-and-lf"
    ),
    pytest.param(Answer(split="bytes:7", crlf=True, chunk_delay_ms=1), id="seven-byte-chunks"),
    pytest.param(Answer(split="whole"), id="one-chunk"),
    pytest.param(Answer(sse_content_length=True), id="sse-with-content-length"),
]


@pytest.mark.parametrize("answer", SPLITS)
def test_stream_edits_only_the_usage_frame(stack: Stack, answer: Answer) -> None:
    answer = Answer(**{**_fields(answer), "tag": tag()})
    result = send(stack, cached_request(stream=True), stack.new_key(), answer)

    client, upstream = split_events(result.body), split_events(result.upstream_sent)
    assert len(client) == len(upstream)
    [(at, usage)] = list(usage_events(client))
    for i, (mine, theirs) in enumerate(zip(client, upstream, strict=True)):
        if i != at:
            assert mine == theirs, i
    edited, original = event_json(client[at]), event_json(upstream[at])
    assert {k: v for k, v in edited.items() if k != "usage"} == {
        k: v for k, v in original.items() if k != "usage"
    }
    assert {k: usage[k] for k in original["usage"]} == original["usage"]
    assert usage["cache_creation_input_tokens"] > 0
    assert client[at].endswith(b"\r\n\r\n" if answer.crlf else b"\n\n")


def _fields(answer: Answer) -> dict[str, Any]:
    return {f: getattr(answer, f) for f in Answer.__dataclass_fields__}


def test_json_answer_keeps_every_other_field(stack: Stack) -> None:
    result = send(stack, cached_request(), stack.new_key())

    edited, original = result.json(), codec.loads(result.upstream_sent)
    assert {k: v for k, v in edited.items() if k != "usage"} == {
        k: v for k, v in original.items() if k != "usage"
    }
    assert int(result.headers["content-length"]) == len(result.body)


REJECTIONS = [
    pytest.param("not-an-object", "malformed_cache_control", id="malformed"),
    pytest.param({"ttl": "5m"}, "malformed_cache_control", id="type-missing"),
    pytest.param({"type": "ephemeral", "ttl": 5}, "malformed_cache_control", id="ttl-not-string"),
    pytest.param({"type": "persistent"}, "unsupported_type", id="unsupported-type"),
    pytest.param({"type": "ephemeral", "ttl": "2h"}, "invalid_ttl", id="invalid-ttl"),
]


@pytest.mark.parametrize(("cache", "reason"), REJECTIONS)
@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_bad_markers_get_a_400_and_never_reach_the_upstream(
    stack: Stack, cache: Any, reason: str, streamed: bool
) -> None:
    body = {
        "model": "demo",
        "stream": streamed,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": cache}]}
        ],
    }
    result = exchange(stack, body, stack.new_key())

    _assert_rejected(result, reason)


def test_a_disabled_tier_gets_a_400_naming_the_available_ones(stack: Stack) -> None:
    enabled = [t.strip() for t in stack.enabled_ttls.split(",")]
    disabled = [t for t in ("5m", "1h", "24h") if t not in enabled]
    if not disabled:
        pytest.skip("every tier is enabled on this stack")
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": [text("hi", marker(disabled[0]))]}],
    }
    result = exchange(stack, body, stack.new_key())

    _assert_rejected(result, "tier_disabled")
    available = ", ".join(t for t in ("5m", "1h", "24h") if t in enabled)
    assert f"available tiers: {available}" in result.json()["error"]["message"]


def test_too_many_breakpoints_get_a_400(stack: Stack) -> None:
    blocks = [text(f"part {i}", marker()) for i in range(5)]
    body = {"model": "demo", "messages": [{"role": "user", "content": blocks}]}
    _assert_rejected(exchange(stack, body, stack.new_key()), "too_many_breakpoints")


def test_bad_markers_are_rejected_even_without_a_key_or_enabled_model(stack: Stack) -> None:
    body = {
        "model": "demo-off",
        "messages": [{"role": "user", "content": [text("x", marker("2h"))]}],
    }
    _assert_rejected(exchange(stack, body, None), "invalid_ttl")


def _assert_rejected(result: Any, reason: str) -> None:
    assert result.status == 400, result.body
    assert result.headers["content-type"].startswith("application/json")
    error = result.json()["error"]
    assert error["code"] == "invalid_cache_control"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages[].content[].cache_control"
    assert error["message"].startswith(reason + ":")
    assert result.upstream_body is None


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"model": "demo", "messages": [', id="truncated-json"),
        pytest.param(b"model=demo&messages=hi", id="form-data"),
        pytest.param(b'["a", "json", "array"]', id="json-array"),
        pytest.param(b"", id="empty"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_forwarded_untouched(stack: Stack, raw: bytes) -> None:
    result = exchange(stack, raw, stack.new_key())

    assert result.upstream_body == raw
    assert result.status == 400  # the fake upstream's own answer
    assert result.body == result.upstream_sent


@pytest.mark.parametrize(
    ("model", "key"),
    [
        pytest.param("demo-off", True, id="model-not-enabled"),
        pytest.param("unknown-model", True, id="model-unknown-to-everyone"),
        pytest.param("demo", False, id="no-bearer-token"),
    ],
)
@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_inactive_requests_get_the_upstream_usage_untouched(
    stack: Stack, model: str, key: bool, streamed: bool
) -> None:
    body = cached_request(model=model, stream=streamed)
    result = send(stack, body, stack.new_key() if key else None)

    assert result.body == result.upstream_sent
    assert result.upstream_body is not None
    assert b"cache_control" not in result.upstream_body


def test_a_prefix_below_the_model_floor_gets_zero_fields(stack: Stack) -> None:
    key = stack.new_key()
    body = cached_request(model="demo-floor")
    send(stack, body, key)
    usage = usage_of(send(stack, body, key), streamed=False)

    assert cache_fields(usage) == {
        "read": 0,
        "created": 0,
        "cached_tokens": 0,
        "5m": 0,
        "1h": 0,
        "24h": 0,
    }


def test_no_markers_gets_zero_fields_on_an_enabled_model(stack: Stack) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}
    usage = usage_of(send(stack, body, stack.new_key()), streamed=False)

    assert usage["cache_read_input_tokens"] == usage["cache_creation_input_tokens"] == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("POST", "/v1/embeddings", id="embeddings"),
        pytest.param("POST", "/v1/completions", id="legacy-completions"),
        pytest.param("GET", "/v1/models", id="models"),
        pytest.param("GET", CHAT, id="get-on-the-chat-path"),
        pytest.param("POST", CHAT + "/", id="trailing-slash"),
    ],
)
def test_other_routes_pass_untouched_and_never_reach_the_server(
    stack: Stack, method: str, path: str
) -> None:
    stat = "http.llm.ext_proc.extproc.streams_started"
    before = stack.envoy_stat(stat)
    body = codec.dumps(cached_request())
    answer = Answer(tag=tag())
    with stack.client() as client:
        response = client.request(
            method, path, content=body, headers={"x-fake-upstream": answer.encode()}
        )

    [record] = stack.records(answer.tag)
    assert response.status_code == 200
    assert record.body == body
    assert response.content == b"".join(record.sent)
    assert stack.envoy_stat(stat) == before


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/chat/completions", id="no-version"),
        pytest.param("/openai/v1/chat/completions", id="prefixed"),
        pytest.param(CHAT + "?api-version=2024-10-01", id="query-string"),
    ],
)
def test_chat_path_variants_are_processed(stack: Stack, path: str) -> None:
    key = stack.new_key()
    result = exchange(stack, cached_request(), key, path=path)

    assert result.status == 200
    assert result.upstream_body is not None
    assert b"cache_control" not in result.upstream_body
    assert result.json()["usage"]["cache_creation_input_tokens"] > 0
