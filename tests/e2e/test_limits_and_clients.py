"""Body size limits, the official OpenAI client, and a slow tokenizer that never holds tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from extproc.core import codec
from tests.e2e.chat import (
    CHAT,
    DOCUMENT,
    SYSTEM,
    Answer,
    cache_fields,
    cached_request,
    exchange,
    headers,
    split_events,
    stream_usage,
    tag,
    text,
    wait_for_read,
)
from tests.fakes.upstream import HEADER
from tests.plugins.stack import Stack, StackSettings

pytestmark = pytest.mark.e2e

STACK = StackSettings(max_body_bytes=256 * 1024)


def _body_of_size(size: int) -> bytes:
    """A cached request whose JSON is exactly ``size`` bytes, the bulk in its uncached tail."""
    body = cached_request()
    body["messages"].append({"role": "user", "content": [text("")]})
    filler = size - len(codec.dumps(body))
    assert filler > 0
    body["messages"][-1]["content"][0]["text"] = ("lorem ipsum " * (filler // 12 + 1))[:filler]
    raw = codec.dumps(body)
    assert len(raw) == size
    return raw


def test_a_body_at_the_limit_is_processed(stack: Stack) -> None:
    raw = _body_of_size(stack.max_body_bytes)
    result = exchange(stack, raw, stack.new_key())

    assert result.status == 200, result.body
    assert result.upstream_body is not None
    assert codec.loads(result.upstream_body)["messages"][-1] == codec.loads(raw)["messages"][-1]
    assert b"cache_control" not in result.upstream_body
    if stack.tokenizer is not None:
        expected = sum(stack.tokenizer.count("demo", [SYSTEM, DOCUMENT]))
        assert result.json()["usage"]["cache_creation_input_tokens"] == expected


def test_a_body_above_the_limit_fails_cleanly(stack: Stack) -> None:
    raw = _body_of_size(stack.max_body_bytes + 4096)
    result = exchange(stack, raw, stack.new_key())

    assert result.upstream_body is None
    if result.status == 400:
        assert result.json()["error"]["code"] == "body_read_failed"
    else:
        assert result.status == 413


@pytest.fixture
def key(stack: Stack) -> str:
    return stack.new_key()


def _openai(stack: Stack, key: str, answer: Answer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.url + "/v1",
        api_key=key,
        default_headers={HEADER: answer.encode()},
        max_retries=0,
        timeout=60.0,
    )


def _messages() -> list[Any]:
    return cached_request()["messages"]


def _cache(usage: Any) -> tuple[int, int, int]:
    extra = usage.model_extra or {}
    return (
        extra["cache_read_input_tokens"],
        extra["cache_creation_input_tokens"],
        usage.prompt_tokens_details.cached_tokens,
    )


def test_openai_client_sees_the_cache_fields(stack: Stack, key: str) -> None:
    with _openai(stack, key, Answer(tag=tag())) as client:
        first = client.chat.completions.create(model="demo", messages=_messages())
        wait_for_read(stack, cached_request(), key)
        second = client.chat.completions.create(model="demo", messages=_messages())

    assert first.usage is not None
    assert second.usage is not None
    read, created, cached = _cache(first.usage)
    assert (read, cached) == (0, 0)
    assert created > 0
    assert _cache(second.usage) == (created, 0, created)
    assert first.usage.prompt_tokens == Answer().prompt_tokens


def _streamed_usage(client: openai.OpenAI) -> Any:
    chunks = client.chat.completions.create(
        model="demo",
        messages=_messages(),
        stream=True,
        stream_options={"include_usage": True},
    )
    with chunks:
        usages = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert len(usages) == 1
    return usages[0]


def test_openai_client_streaming_sees_the_cache_fields(stack: Stack, key: str) -> None:
    with _openai(stack, key, Answer(tag=tag())) as client:
        first = _streamed_usage(client)
        wait_for_read(stack, cached_request(stream=True), key)
        second = _streamed_usage(client)

    read, created, _ = _cache(first)
    assert read == 0
    assert created > 0
    assert _cache(second) == (created, 0, created)
    assert getattr(second, "cache_read_input_tokens") == created  # noqa: B009


@pytest.fixture
def slow_tokenizer(stack: Stack) -> Iterator[Any]:
    if stack.tokenizer is None:
        pytest.skip("needs the suite's own tokenizer service to slow it down")
    tokenizer = stack.tokenizer
    yield tokenizer
    tokenizer.tokenize_delay = 0.0


def test_first_sse_chunk_does_not_wait_for_a_slow_tokenizer(
    stack: Stack, key: str, slow_tokenizer: Any
) -> None:
    # Below the server's tokenizer call timeout (1 s) and its classify deadline, so the usage frame
    # gets the real split; a server that held the stream for classification would release
    # the first chunk only after the tokenizer answered.
    slow_tokenizer.tokenize_delay = 0.75
    answered_before = slow_tokenizer.answered
    answer = Answer(tag=tag(), hold_after=1)  # the rest, usage frame included, comes later
    body = codec.dumps({**cached_request(), "stream": True})
    with stack.client() as client:
        request = client.build_request("POST", CHAT, content=body, headers=headers(key, answer))
        response = client.send(request, stream=True)
        try:
            chunks = response.iter_raw()
            first = next(chunks)
            answered_at_first_chunk = slow_tokenizer.answered - answered_before
            stack.release(answer.tag)
            rest = b"".join(chunks)
        finally:
            response.close()

    assert first
    assert answered_at_first_chunk == 0
    assert slow_tokenizer.answered - answered_before >= 1
    usage = stream_usage(first + rest)
    assert usage["cache_creation_input_tokens"] > 0


def test_a_tokenizer_slower_than_its_timeout_degrades_to_zero_fields(
    stack: Stack, key: str, slow_tokenizer: Any
) -> None:
    slow_tokenizer.tokenize_delay = 2.5
    result = exchange(stack, {**cached_request(), "stream": True}, key)

    assert result.status == 200
    assert cache_fields(stream_usage(result.body))["created"] == 0
    assert len(split_events(result.body)) == len(split_events(result.upstream_sent))


def test_counts_are_the_tokenizers(stack: Stack, key: str) -> None:
    if stack.tokenizer is None:
        pytest.skip("needs the suite's own tokenizer to know the real counts")
    system, document = stack.tokenizer.count("demo", [SYSTEM, DOCUMENT])
    usage = exchange(stack, cached_request(), key).json()["usage"]

    assert usage["cache_creation"]["ephemeral_1h_input_tokens"] == system
    assert usage["cache_creation"]["ephemeral_5m_input_tokens"] == document


def test_plain_http_client_without_stream_options(stack: Stack, key: str) -> None:
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        response = client.post(
            CHAT,
            content=codec.dumps({**cached_request(), "stream": True}),
            headers=headers(key, Answer(tag=tag(), crlf=True)),
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in response.headers
    assert stream_usage(response.content)["cache_creation_input_tokens"] > 0
