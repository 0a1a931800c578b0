"""The demo upstream speaks OpenAI's chat-completions dialect, checked with the real client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from extproc.core import codec
from extproc.devtools.upstream import (
    TOKENS_FOR_REPLY,
    TOKENS_PER_MESSAGE,
    UpstreamSettings,
    bound_port,
    estimate_tokens,
    load_counter,
    prompt_tokens,
    start_upstream,
)

MESSAGES: list[Any] = [
    {"role": "system", "content": [{"type": "text", "text": "abcdefgh"}]},
    {"role": "user", "content": "hi"},
]
# 8 bytes -> 2 tokens, 2 bytes -> 1 token, plus the template overhead of two messages.
MESSAGES_ESTIMATE = 2 + 1 + 2 * TOKENS_PER_MESSAGE + TOKENS_FOR_REPLY


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        pytest.param("", 0, id="empty"),
        pytest.param("abc", 1, id="under-four-bytes"),
        pytest.param("abcd", 1, id="four-bytes"),
        pytest.param("abcde", 2, id="rounds-up"),
        pytest.param("\u00e9\u00e9", 1, id="counts-utf8-bytes"),
    ],
)
def test_estimate_tokens(text: str, tokens: int) -> None:
    assert estimate_tokens(text) == tokens


@pytest.mark.parametrize(
    ("messages", "tokens"),
    [
        pytest.param(MESSAGES, MESSAGES_ESTIMATE, id="string-and-parts"),
        pytest.param(
            [{"role": "user", "content": None}], TOKENS_PER_MESSAGE + TOKENS_FOR_REPLY, id="null"
        ),
        pytest.param(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            TOKENS_PER_MESSAGE + TOKENS_FOR_REPLY,
            id="no-text-parts",
        ),
    ],
)
def test_prompt_tokens(messages: list[Any], tokens: int) -> None:
    assert prompt_tokens(messages, estimate_tokens) == tokens


def _word_tokenizer(path: Path) -> Path:
    vocab = {"[UNK]": 0, "static": 1, "system": 2, "hi": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def test_counter_from_tokenizer_file(tmp_path: Path) -> None:
    count = load_counter(_word_tokenizer(tmp_path / "tokenizer.json"))
    assert [count(""), count("static system"), count("hi there you")] == [0, 2, 3]


async def _serve(settings: UpstreamSettings) -> AsyncIterator[str]:
    runner = await start_upstream(settings, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    async for url in _serve(UpstreamSettings(models=("demo", "other"))):
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-test") as client:
        yield client


async def test_json_answer(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(model="demo", messages=MESSAGES)
    assert answer.model == "demo"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == MESSAGES_ESTIMATE
    text = answer.choices[0].message.content or ""
    assert answer.usage.completion_tokens == estimate_tokens(text) > 0
    assert answer.usage.total_tokens == MESSAGES_ESTIMATE + answer.usage.completion_tokens


async def test_max_tokens_cuts_the_answer(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=3)
    assert answer.choices[0].finish_reason == "length"
    assert len((answer.choices[0].message.content or "").split()) == 3


async def test_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="demo", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    *content, last = chunks
    assert all(c.usage is None and len(c.choices) == 1 for c in content)
    assert content[-1].choices[0].finish_reason == "stop"
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == MESSAGES_ESTIMATE
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert last.usage.completion_tokens == estimate_tokens(text)


async def test_stream_without_usage_has_no_usage_frame(base_url: str) -> None:
    body = {"model": "demo", "messages": MESSAGES, "stream": True}
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{base_url}/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [codec.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)


async def test_models(client: openai.AsyncOpenAI) -> None:
    listed = [m.id async for m in client.models.list()]
    assert listed == ["demo", "other"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b'{"messages":[{"role":"user","content":"x"}]}', id="no-model"),
        pytest.param(b'{"model":"demo","messages":[]}', id="no-messages"),
    ],
)
async def test_bad_requests_get_openai_errors(base_url: str, body: bytes) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{base_url}/v1/chat/completions", content=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_prompt_tokens_from_tokenizer(tmp_path: Path) -> None:
    settings = UpstreamSettings(tokenizer=_word_tokenizer(tmp_path / "tokenizer.json"))
    body = {"model": "demo", "messages": [{"role": "system", "content": "static system"}]}
    async for url in _serve(settings):
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{url}/v1/chat/completions", json=body)
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == 2 + TOKENS_PER_MESSAGE + TOKENS_FOR_REPLY
