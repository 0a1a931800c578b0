"""The demo upstream: a small LLM server (chat completions, Messages, Responses) for local use.

It runs no model. Every request gets the same canned answer, as JSON or as an SSE stream, with
a realistic ``usage`` object: ``prompt_tokens`` counts the text of every message with a real
tokenizer when one is configured (a Hugging Face ``tokenizer.json``), else with a byte-based
estimate (one token per four UTF-8 bytes, rounded up), plus a fixed overhead per message for
the chat template. With ``stream_options.include_usage`` the stream ends with a chunk whose
``choices`` is empty and that carries the usage, then ``data: [DONE]``, as OpenAI does.
``POST /v1/messages`` and ``POST /v1/responses`` answer the same reply in those APIs' shapes
(``demo_apis``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from extproc.core import codec
from extproc.devtools import demo_apis

TokenCounter = Callable[[str], int]

DEFAULT_REPLY = (
    "Hello from the extproc demo upstream. No model runs here: every request gets this "
    "answer, and the usage object below is what the sidecar edits."
)
# What a chat template adds around each message (role markers), and to prime the reply.
TOKENS_PER_MESSAGE = 4
TOKENS_FOR_REPLY = 3
BYTES_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """What the demo upstream serves."""

    models: tuple[str, ...] = ("demo",)
    reply: str = DEFAULT_REPLY
    tokenizer: Path | None = None


def estimate_tokens(text: str) -> int:
    """The byte-based estimate: one token per four UTF-8 bytes, rounded up."""
    return -(-len(text.encode()) // BYTES_PER_TOKEN)


def load_counter(path: Path | None) -> TokenCounter:
    """A counter backed by the ``tokenizer.json`` at ``path``, or the byte estimate."""
    if path is None:
        return estimate_tokens
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids) if text else 0

    return count


def message_texts(message: Any) -> Iterator[str]:
    """The text parts of one chat message: string content or the ``text`` of its parts."""
    if not isinstance(message, dict):
        return
    content = message.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def prompt_tokens(messages: Sequence[Any], count: TokenCounter) -> int:
    """Tokens of every message's text plus the template overhead."""
    text = sum(count(t) for m in messages for t in message_texts(m))
    return text + TOKENS_PER_MESSAGE * len(messages) + TOKENS_FOR_REPLY


@dataclass(frozen=True, slots=True)
class Completion:
    """One answer: its id, model, words and usage."""

    id: str
    model: str
    created: int
    pieces: tuple[str, ...]
    finish_reason: str
    usage: dict[str, int]

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def complete(
    body: dict[str, Any], settings: UpstreamSettings, count: TokenCounter, prompt: int | None = None
) -> Completion:
    """Build the answer to a validated request body (``prompt``: its counted input, if known)."""
    pieces = _split_words(settings.reply)
    limit = (
        body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    )
    finish = "stop"
    if isinstance(limit, int) and 0 < limit < len(pieces):
        pieces, finish = pieces[:limit], "length"
    if prompt is None:
        prompt = prompt_tokens(body["messages"], count)
    completion = count("".join(pieces))
    return Completion(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        model=str(body["model"]),
        created=int(time.time()),
        pieces=pieces,
        finish_reason=finish,
        usage={
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    )


def _split_words(text: str) -> tuple[str, ...]:
    words = text.split(" ")
    return tuple(w if i == 0 else " " + w for i, w in enumerate(words))


def completion_json(done: Completion) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` object."""
    return {
        "id": done.id,
        "object": "chat.completion",
        "created": done.created,
        "model": done.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "finish_reason": done.finish_reason,
            }
        ],
        "usage": done.usage,
    }


def completion_events(done: Completion, include_usage: bool) -> Iterator[bytes]:
    """The SSE events of a streamed answer, each a complete ``data: ...\\n\\n`` frame."""
    deltas = itertools.chain(
        [({"role": "assistant", "content": ""}, None)],
        (({"content": piece}, None) for piece in done.pieces),
        [({}, done.finish_reason)],
    )
    for delta, finish in deltas:
        chunk = _chunk(done, [{"index": 0, "delta": delta, "finish_reason": finish}])
        if include_usage:
            chunk["usage"] = None
        yield _frame(chunk)
    if include_usage:
        yield _frame({**_chunk(done, []), "usage": done.usage})
    yield b"data: [DONE]\n\n"


def _chunk(done: Completion, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": done.id,
        "object": "chat.completion.chunk",
        "created": done.created,
        "model": done.model,
        "choices": choices,
    }


def _frame(chunk: dict[str, Any]) -> bytes:
    return b"data: " + codec.dumps(chunk) + b"\n\n"


def request_problem(body: Any) -> str | None:
    """Why ``body`` is not a chat-completions request, or ``None`` when it is one."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "'model' is required and must be a string"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' is required and must be a non-empty array"
    return None


def error_response(status: int, message: str, code: str | None = None) -> web.Response:
    """An OpenAI-style error envelope."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return web.Response(
        status=status, body=codec.dumps({"error": error}), content_type="application/json"
    )


class DemoUpstream:
    """The aiohttp handlers of the demo upstream."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings
        self._count = load_counter(settings.tokenizer)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = codec.loads(await request.read())
        except codec.JSONDecodeError:
            return error_response(400, "the request body is not valid JSON")
        problem = request_problem(body)
        if problem is not None:
            return error_response(400, problem)
        done = complete(body, self._settings, self._count)
        if body.get("stream") is not True:
            payload = codec.dumps(completion_json(done))
            return web.Response(body=payload, content_type="application/json")
        return await self._stream(request, done, _include_usage(body))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = _json_or_none(await request.read())
        problem = demo_apis.messages_problem(body)
        if problem is not None:
            error = demo_apis.anthropic_error(problem)
            return web.Response(status=400, body=error, content_type="application/json")
        prompt = demo_apis.messages_prompt(body, self._count)
        done = complete(body, self._settings, self._count, prompt)
        if body.get("stream") is not True:
            payload = codec.dumps(demo_apis.message_json(done))
            return web.Response(body=payload, content_type="application/json")
        return await self._send_events(request, demo_apis.message_events(done))

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = _json_or_none(await request.read())
        problem = demo_apis.responses_problem(body)
        if problem is not None:
            return error_response(400, problem)
        prompt = demo_apis.responses_prompt(body, self._count)
        done = complete(body, self._settings, self._count, prompt)
        if body.get("stream") is not True:
            payload = codec.dumps(demo_apis.response_json(done))
            return web.Response(body=payload, content_type="application/json")
        return await self._send_events(request, demo_apis.response_events(done))

    async def _stream(
        self, request: web.Request, done: Completion, include_usage: bool
    ) -> web.StreamResponse:
        return await self._send_events(request, completion_events(done, include_usage))

    async def _send_events(
        self, request: web.Request, events: Iterator[bytes]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for event in events:
            await response.write(event)
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "extproc-demo"}
            for m in self._settings.models
        ]
        return web.Response(
            body=codec.dumps({"object": "list", "data": data}), content_type="application/json"
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")


def _json_or_none(raw: bytes) -> Any:
    try:
        return codec.loads(raw)
    except codec.JSONDecodeError:
        return None


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def start_upstream(settings: UpstreamSettings, host: str, port: int) -> web.AppRunner:
    """Start serving on ``host:port`` (port 0 picks one); the caller cleans the runner up."""
    runner = web.AppRunner(DemoUpstream(settings).app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port the first site of ``runner`` listens on."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("the upstream is not listening")
