"""Anthropic Messages and OpenAI Responses through Envoy and the real server, with the real SDKs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest

from extproc.core import codec
from tests.e2e.chat import (
    CHAT,
    DOCUMENT,
    SYSTEM,
    Answer,
    exchange,
    marker,
    split_events,
    tag,
    text,
)
from tests.fakes.upstream import HEADER, Record
from tests.plugins.stack import Stack

pytestmark = pytest.mark.e2e

MESSAGES = "/v1/messages"
RESPONSES = "/v1/responses"
PROMPT = 1000  # what the fake upstream reports as the whole prompt
STREAMED = [pytest.param(False, id="json"), pytest.param(True, id="sse")]
WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "Current weather for a city, in degrees Celsius.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "the city name"}},
        "required": ["city"],
    },
}
FORECAST: dict[str, Any] = {
    "name": "get_forecast",
    "description": "The forecast for the next days of a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}


def _canonical(value: Any) -> str:
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "cache_control"}
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _segment(block: dict[str, Any]) -> str:
    """What DESIGN §12.1 tokenizes of a Messages block (an oracle written from the spec)."""
    if block["type"] == "text":
        return str(block["text"])
    if block["type"] in ("tool_use", "tool_result"):
        return _canonical(block)
    raise AssertionError(f"unexpected block {block}")


def _messages_segments(body: dict[str, Any]) -> list[str]:
    """Every block's segment of a forwarded Messages body, in Anthropic's prefix order."""
    segments = [_canonical(tool) for tool in body.get("tools", [])]
    segments += [_segment(b) for b in body["system"]]
    for message in body["messages"]:
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        segments += [_segment(b) for b in blocks]
    return segments


def _tokens(stack: Stack, texts: list[str]) -> list[int]:
    if stack.tokenizer is None:
        pytest.skip("needs the suite's own tokenizer to know the real counts")
    return list(stack.tokenizer.count("demo", texts))


def _only(stack: Stack, answer: Answer) -> Record:
    (record,) = stack.records(answer.tag)
    assert b"cache_control" not in record.body
    return record


def _wait_for_entries(stack: Stack, key: str, count: int) -> None:
    """Commits land after the answer: wait until ``key`` has ``count`` index entries."""
    for _ in range(100):
        if len(stack.entries(key)) >= count:
            assert len(stack.entries(key)) == count
            return
        time.sleep(0.05)
    raise AssertionError(f"{len(stack.entries(key))} entries, never {count}")


# ---- Anthropic Messages: a three-turn tool loop with the official SDK ----


def _anthropic(stack: Stack, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, auth_token=key, api_key=None, max_retries=0)


def _ask(
    client: anthropic.Anthropic, streamed: bool, answer: Answer, **params: Any
) -> tuple[anthropic.types.Message, dict[str, Any]]:
    """The answer as the SDK builds it, and the per-tier creation the client was told.

    A stream's tiers are on its ``message_delta`` (the SDK copies the four counts from there
    onto the message, not the tiers).
    """
    headers = {HEADER: answer.encode()}
    if not streamed:
        message = client.messages.create(extra_headers=headers, **params)
        assert message.usage.cache_creation is not None
        return message, message.usage.cache_creation.model_dump()
    with client.messages.stream(extra_headers=headers, **params) as stream:
        deltas = [e for e in stream if e.type == "message_delta"]
        message = stream.get_final_message()
    (delta,) = deltas
    return message, (delta.usage.model_extra or {})["cache_creation"]


def _unmark(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same turns with their markers moved away (an agent marks only the newest turn)."""
    out = codec.loads(codec.dumps(history))
    for message in out:
        for block in message["content"] if isinstance(message["content"], list) else []:
            block.pop("cache_control", None)
    return out


def _as_param(message: anthropic.types.Message) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": [b.model_dump(exclude_none=True) for b in message.content],
    }


@pytest.mark.parametrize("streamed", STREAMED)
def test_anthropic_sdk_tool_loop_reads_each_previous_turn(stack: Stack, streamed: bool) -> None:
    key = stack.new_key()
    with _anthropic(stack, key) as client:
        _tool_loop(stack, key, client, streamed)


def _tool_loop(stack: Stack, key: str, client: anthropic.Anthropic, streamed: bool) -> None:
    # vLLM 0.33 with prompt-token details (its own cache numbers on every usage) for JSON,
    # SGLang (numbers on message_start only) for streams: the split must be right for both
    engine = (
        {"flavour": "sglang", "engine_cached": 200}
        if streamed
        else {"flavour": "details", "engine_cached": 300, "engine_written": 100}
    )
    params: dict[str, Any] = {
        "model": "demo",
        "max_tokens": 256,
        "tools": [WEATHER, {**FORECAST, "cache_control": marker("1h")}],
        "system": [text(SYSTEM, marker("1h"))],
    }
    history: list[dict[str, Any]] = [
        {"role": "user", "content": [text("Should I take an umbrella in Lisbon?", marker())]}
    ]
    turns = [("get_weather", {"city": "Lisbon"}), ("get_forecast", {"city": "Lisbon", "days": 2})]
    read, entries, usages, blocks_before = 0, 0, [], 0
    for turn in range(3):
        call = turns[turn] if turn < 2 else (None, {})
        answer = Answer(tag=tag(), tool_call=call[0], tool_input=call[1], **engine)
        message, tiers = _ask(client, streamed, answer, messages=history, **params)
        record = _only(stack, answer)
        segments = _messages_segments(record.json())
        counts = _tokens(stack, segments)
        usage = message.usage
        usages.append(usage)

        # the read is everything up to the previous turn's tip, the rest is written
        assert usage.cache_read_input_tokens == read
        created = sum(counts[blocks_before:])
        assert usage.cache_creation_input_tokens == created
        hour = sum(counts[:3]) if turn == 0 else 0  # tools and system in 1h, then 5m only
        # the stack's 24h tier is disabled: no key for it
        assert tiers == {
            "ephemeral_1h_input_tokens": hour,
            "ephemeral_5m_input_tokens": created - hour,
        }
        assert read + created + usage.input_tokens == PROMPT  # Anthropic's arithmetic
        assert usage.output_tokens == answer.completion_tokens

        entries += 3 if turn == 0 else 1
        _wait_for_entries(stack, key, entries)
        read, blocks_before = sum(counts), len(counts)
        if turn < 2:
            assert message.stop_reason == "tool_use"
            (use,) = [b for b in message.content if b.type == "tool_use"]
            result = {"type": "tool_result", "tool_use_id": use.id, "content": "18°C, rain"}
            history = [
                *_unmark(history),
                _as_param(message),
                {"role": "user", "content": [{**result, "cache_control": marker()}]},
            ]
    assert [u.cache_read_input_tokens for u in usages][1:] == sorted(
        u.cache_read_input_tokens for u in usages[1:]
    )
    assert usages[1].cache_read_input_tokens > 0


def test_a_key_in_x_api_key_is_accounted(stack: Stack) -> None:
    """Anthropic's API takes the key in ``x-api-key``; clients configured that way count."""
    key = stack.new_key()
    answer = Answer(tag=tag())
    body = {
        "model": "demo",
        "max_tokens": 32,
        "system": [text(SYSTEM, marker())],
        "messages": [{"role": "user", "content": "hi"}],
    }
    request_headers = {"x-api-key": key, "anthropic-version": "2023-06-01", HEADER: answer.encode()}
    with stack.client() as client:
        response = client.post(MESSAGES, content=codec.dumps(body), headers=request_headers)
    assert response.status_code == 200, response.text
    (system,) = _tokens(stack, [SYSTEM])
    assert response.json()["usage"]["cache_creation_input_tokens"] == system
    record = _only(stack, answer)
    assert record.headers["x-api-key"] == key  # the upstream still gets it
    assert "authorization" not in record.headers
    _wait_for_entries(stack, key, 1)


def test_messages_stream_is_edited_only_in_its_usage(stack: Stack) -> None:
    key = stack.new_key()
    body = {
        "model": "demo",
        "max_tokens": 64,
        "stream": True,
        "system": [text(SYSTEM, marker("1h"))],
        "messages": [{"role": "user", "content": "Hello"}],
    }
    answer = Answer(tag=tag(), crlf=True, split="awkward")
    result = exchange(stack, body, key, answer, path=MESSAGES)
    assert result.status == 200, result.body
    assert result.headers["content-type"].startswith("text/event-stream")
    sent, got = split_events(result.upstream_sent), split_events(result.body)
    assert len(sent) == len(got)
    changed = [i for i, (a, b) in enumerate(zip(sent, got, strict=True)) if a != b]
    names = [e.split(b"\r\n")[0].decode() for e in got]
    # message_start has the split only if it was known by then; message_delta always has it
    assert {names[i] for i in changed} <= {"event: message_start", "event: message_delta"}
    assert names.index("event: message_delta") in changed
    assert got[-1] == sent[-1] == b'event: message_stop\r\ndata: {"type":"message_stop"}\r\n\r\n'


# ---- OpenAI Responses with the official SDK ----


def _responses_call(stack: Stack, key: str, streamed: bool, answer: Answer, question: str) -> Any:
    params: dict[str, Any] = {
        "model": "demo",
        "instructions": SYSTEM,
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": DOCUMENT, "cache_control": marker("1h")},
                    {"type": "input_text", "text": question},
                ],
            }
        ],
        "extra_body": {"cache_control": marker()},  # automatic caching: the question too
        "extra_headers": {HEADER: answer.encode()},
    }
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0) as client:
        if not streamed:
            return client.responses.create(**params).usage
        events = list(client.responses.create(stream=True, **params))
    assert [e.type for e in events][:2] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.completed"
    return events[-1].response.usage


def _extra(usage: Any, name: str) -> Any:
    return (usage.model_extra or {})[name]


@pytest.mark.parametrize("streamed", STREAMED)
def test_openai_sdk_responses_write_then_read(stack: Stack, streamed: bool) -> None:
    key = stack.new_key()
    system, document, first, second = _tokens(
        stack, [SYSTEM, DOCUMENT, "What did we spend on rent?", "And on travel?"]
    )
    answer = Answer(tag=tag(), engine_cached=640, crlf=streamed)
    usage = _responses_call(stack, key, streamed, answer, "What did we spend on rent?")
    _only(stack, answer)
    assert usage.input_tokens == PROMPT  # never changed on this API
    assert usage.input_tokens_details.cached_tokens == 0  # the engine's 640 replaced
    assert usage.input_tokens_details.cache_write_tokens == system + document + first
    assert _extra(usage, "cache_creation") == {  # chat's fields: every tier, as chat has
        "ephemeral_5m_input_tokens": first,
        "ephemeral_1h_input_tokens": system + document,
        "ephemeral_24h_input_tokens": 0,
    }
    _wait_for_entries(stack, key, 2)

    answer = Answer(tag=tag(), engine_cached=640, crlf=streamed)
    usage = _responses_call(stack, key, streamed, answer, "And on travel?")
    assert usage.input_tokens_details.cached_tokens == system + document
    assert _extra(usage, "cache_read_input_tokens") == system + document
    assert _extra(usage, "cache_creation_input_tokens") == second


# ---- bad markers on every route; an error event commits nothing ----

BAD = {"type": "ephemeral", "ttl": "2h"}
BAD_BODIES: dict[str, Callable[[], dict[str, Any]]] = {
    CHAT: lambda: {"model": "demo", "messages": [{"role": "user", "content": [text("x", BAD)]}]},
    MESSAGES: lambda: {
        "model": "demo",
        "max_tokens": 8,
        "system": [text(SYSTEM, BAD)],
        "messages": [{"role": "user", "content": "x"}],
    },
    RESPONSES: lambda: {
        "model": "demo",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "x", "cache_control": BAD}]}
        ],
    },
}


@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES])
def test_bad_markers_get_the_routes_400_and_never_reach_the_upstream(
    stack: Stack, path: str
) -> None:
    result = exchange(stack, BAD_BODIES[path](), stack.new_key(), path=path)
    assert result.status == 400, result.body
    assert result.upstream_body is None
    message = 'invalid cache_control ttl: "2h"'
    if path == MESSAGES:
        error = {"type": "invalid_request_error", "message": message}
        assert result.json() == {"type": "error", "error": error}
    else:
        assert result.json()["error"]["message"] == message
        assert result.json()["error"]["code"] == "invalid_cache_control"


def test_count_tokens_passes_untouched(stack: Stack) -> None:
    body = codec.dumps(BAD_BODIES[MESSAGES]())
    result = exchange(stack, body, stack.new_key(), path=f"{MESSAGES}/count_tokens")
    assert result.status == 200
    assert result.upstream_body == body  # markers and all: not ours


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param(
            MESSAGES,
            {
                "model": "demo",
                "max_tokens": 64,
                "system": [text(SYSTEM, marker())],
                "messages": [{"role": "user", "content": "hi"}],
            },
            id="messages-error-event",
        ),
        pytest.param(
            RESPONSES,
            {"model": "demo", "instructions": SYSTEM, "input": "hi", "cache_control": marker()},
            id="responses-failed-event",
        ),
    ],
)
def test_an_error_event_in_a_stream_commits_nothing(
    stack: Stack, path: str, body: dict[str, Any]
) -> None:
    key = stack.new_key()
    failed = Answer(tag=tag(), error_frame=True, split="awkward")
    result = exchange(stack, {**body, "stream": True}, key, failed, path=path)
    assert result.status == 200
    # only message_start may change (it carries the split when it is known by then)
    assert split_events(result.body)[1:] == split_events(result.upstream_sent)[1:]
    assert b"event: message_stop" not in result.body
    # the same request again, answered well, still writes: nothing was committed before
    again = exchange(stack, {**body, "stream": True}, key, Answer(tag=tag()), path=path)
    assert b'"cache_read_input_tokens":0' in again.body
    _wait_for_entries(stack, key, 1)
