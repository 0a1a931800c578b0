"""The demo upstream speaks Anthropic's Messages and OpenAI's Responses, checked with their SDKs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from extproc.core import codec
from extproc.devtools.demo_apis import TOKENS_FOR_REPLY, TOKENS_PER_MESSAGE
from extproc.devtools.upstream import UpstreamSettings, bound_port, estimate_tokens, start_upstream

SYSTEM = [{"type": "text", "text": "abcdefgh"}]  # 8 bytes: 2 tokens
TOOL: dict[str, Any] = {"name": "t", "input_schema": {"type": "object"}}
# the system's 2, "hi" 1, the tool's compact JSON, the template overhead of a system and a turn
PROMPT = 2 + 1 + estimate_tokens(codec.canonical(TOOL).decode()) + 2 * TOKENS_PER_MESSAGE
PROMPT += TOKENS_FOR_REPLY


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    runner = await start_upstream(UpstreamSettings(), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
    finally:
        await runner.cleanup()


@pytest.fixture
def messages_params() -> dict[str, Any]:
    hi = [{"role": "user", "content": "hi"}]
    return {"model": "demo", "max_tokens": 64, "system": SYSTEM, "tools": [TOOL], "messages": hi}


async def test_messages_json(base_url: str, messages_params: dict[str, Any]) -> None:
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key="sk-test") as client:
        message = await client.messages.create(**messages_params)
    assert message.role == "assistant"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == PROMPT
    text = "".join(b.text for b in message.content if b.type == "text")
    assert message.usage.output_tokens == estimate_tokens(text)


async def test_messages_stream(base_url: str, messages_params: dict[str, Any]) -> None:
    async with (
        anthropic.AsyncAnthropic(base_url=base_url, api_key="sk-test") as client,
        client.messages.stream(**messages_params) as stream,
    ):
        kinds = [event.type async for event in stream]
        message = await stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert message.usage.input_tokens == PROMPT
    assert message.usage.output_tokens > 0


async def test_messages_error_is_anthropics(base_url: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{base_url}/v1/messages", json={"model": "demo"})
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "sse"])
async def test_responses(base_url: str, streamed: bool) -> None:
    params: dict[str, Any] = {
        "model": "demo",
        "instructions": "abcdefgh",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
    }
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-test") as client:
        if streamed:
            events = [e async for e in await client.responses.create(stream=True, **params)]
            assert events[0].type == "response.created"
            assert events[0].response.usage is None
            assert events[-1].type == "response.completed"
            response = events[-1].response
        else:
            response = await client.responses.create(**params)
    assert response.status == "completed"
    assert response.output_text
    assert response.usage is not None
    assert response.usage.input_tokens == 2 + 1 + TOKENS_PER_MESSAGE + TOKENS_FOR_REPLY
    assert response.usage.input_tokens_details.cached_tokens == 0
