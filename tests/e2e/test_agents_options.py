"""Agent traffic on a stack with the non-default settings: telemetry kept, engine reports on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc.core import codec
from tests.e2e.chat import (
    SYSTEM,
    Answer,
    cache_fields,
    cached_request,
    exchange,
    marker,
    send,
    tag,
    text,
    usage_of,
)
from tests.e2e.test_agents import STREAMED, telemetry_request
from tests.plugins.stack import RecordingTokenizer, Stack, StackSettings

pytestmark = pytest.mark.e2e

# Longer than Envoy's 2 s message timeout: a reply that waits for it must extend the timer.
TOKENIZER_TIMEOUT_MS = 2500
STACK = StackSettings(
    classify_deadline_ms=5000,
    extra_env=(
        ("EXTPROC_TELEMETRY_STRIP", "false"),
        ("EXTPROC_ENGINE_CACHE", "report"),
        ("EXTPROC_TOKENIZER_TIMEOUT_MS", str(TOKENIZER_TIMEOUT_MS)),
    ),
)


def test_requests_without_markers_never_ask_the_tokenizer(stack: Stack) -> None:
    stack.require_local()
    assert stack.extproc is not None
    assert stack.tokenizer is not None
    stack.extproc.stop()  # a fresh server: nothing memoised yet
    stack.start_extproc()
    before = sum(stack.tokenizer.requests.values())
    key = stack.new_key()
    for streamed in (False, True):
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        result = send(stack, {**body, "stream": streamed}, key)
        assert cache_fields(usage_of(result, streamed))["read"] == 0
    assert sum(stack.tokenizer.requests.values()) == before


def test_telemetry_blocks_can_be_kept_in_the_forwarded_body(stack: Stack) -> None:
    if stack.tokenizer is None:
        pytest.skip("needs the suite's own tokenizer to know the real counts")
    key = stack.new_key()
    body = telemetry_request(tag())
    result = send(stack, body, key)

    forwarded = codec.loads(result.upstream_body or b"")
    assert forwarded["messages"][0]["content"][0] == body["messages"][0]["content"][0]
    assert "cache_control" not in forwarded["messages"][0]["content"][1]
    created = cache_fields(usage_of(result, streamed=False))["created"]
    assert created == sum(stack.tokenizer.count("demo", [SYSTEM]))  # the billing block: none


@pytest.mark.parametrize("streamed", STREAMED)
def test_the_engines_read_is_reported_for_requests_without_markers(
    stack: Stack, streamed: bool
) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": streamed}
    answer = Answer(tag=tag(), engine_cached=640)
    usage = usage_of(exchange(stack, body, stack.new_key(), answer), streamed)

    assert cache_fields(usage) == {
        "read": 640,
        "created": 0,
        "cached_tokens": 640,
        "5m": 0,
        "1h": 0,
        "24h": 0,
    }


def test_the_engines_read_is_capped_at_the_prompt(stack: Stack) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    answer = Answer(tag=tag(), engine_cached=5000, prompt_tokens=900)
    usage = usage_of(exchange(stack, body, stack.new_key(), answer), streamed=False)

    assert (usage["cache_read_input_tokens"], usage["prompt_tokens_details"]) == (
        900,
        {"cached_tokens": 900},
    )


def test_a_marked_request_is_accounted_by_the_index_alone(stack: Stack) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": [text(SYSTEM, marker())]}]}
    answer = Answer(tag=tag(), engine_cached=640)
    usage = cache_fields(usage_of(exchange(stack, body, stack.new_key(), answer), streamed=False))

    assert (usage["read"], usage["cached_tokens"]) == (0, 0)
    assert usage["created"] > 0


@pytest.fixture
def slow_tokenizer(stack: Stack) -> Iterator[RecordingTokenizer]:
    if stack.tokenizer is None:
        pytest.skip("needs the suite's own tokenizer service to slow it down")
    stack.tokenizer.tokenize_delay = 3.0
    yield stack.tokenizer
    stack.tokenizer.tokenize_delay = 0.0


@pytest.mark.parametrize("streamed", STREAMED)
def test_a_slow_tokenizer_ends_in_zeros_not_in_a_504(
    stack: Stack, slow_tokenizer: RecordingTokenizer, streamed: bool
) -> None:
    # The tokenizer answers after 3 s, the server gives up at 2.5 s: longer than Envoy's 2 s
    # message timeout, so the reply extends Envoy's timer first and then says "no caching".
    body = cached_request(question=f"Slow {tag()}?", stream=streamed)
    result = exchange(stack, body, stack.new_key())

    assert result.status == 200, result.body
    assert cache_fields(usage_of(result, streamed)) == {
        "read": 0,
        "created": 0,
        "cached_tokens": 0,
        "5m": 0,
        "1h": 0,
        "24h": 0,
    }
    assert slow_tokenizer.started >= 1
