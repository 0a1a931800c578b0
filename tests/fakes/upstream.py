"""A programmable fake LLM upstream (chat completions, Messages, Responses) that records requests.

Each request says how it wants to be answered in the ``x-fake-upstream`` header: a compact JSON
``Answer`` (JSON or SSE, usage or not, error frames, odd splits, CRLF, resets, pauses). Every
request is recorded with the exact bytes received and sent; ``GET /__fake/requests?tag=T``
returns the records of one tag. In a test: ``async with FakeUpstream() as up: ... up.url ...``;
as a process (for a running stack)::

    python -m tests.fakes.upstream --port 8000

prints ``listening on http://127.0.0.1:PORT`` once ready and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import itertools
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from extproc.core import codec
from tests.fakes import engines
from tests.fakes.connection import reset_connection

HEADER = "x-fake-upstream"
CONTROL = "/__fake"
CREATED = 1_700_000_000
# How long a paused or held stream waits for the client to go away or a release.
MAX_PAUSE_S = 30.0
# Before a reset: time for the peer to read what was sent (a RST discards unread data).
DRAIN_BEFORE_RESET_S = 0.2


@dataclass(frozen=True, slots=True)
class Answer:
    """How the fake answers one request (sent as JSON in the ``x-fake-upstream`` header)."""

    tag: str = ""
    status: int = 200
    content: str = "Hello from the fake upstream."
    prompt_tokens: int = 1000
    completion_tokens: int = 7
    usage: bool = True  # False: no usage object anywhere
    crlf: bool = False  # SSE lines end in \r\n
    split: str = "frames"  # frames | awkward | whole | bytes:N
    comment: bool = True  # an SSE comment line before the first content frame
    error_frame: bool = False  # a data: {"error": ...} frame before the finish frame
    reset_after: int | None = None  # abort the connection (TCP RST) after this many chunks
    pause_after: int | None = None  # stop after this many chunks until the client goes away
    # stop after this many chunks until POST /__fake/release (before a reset at the same count)
    hold_after: int | None = None
    chunk_delay_ms: int = 0  # between chunks
    sse_content_length: bool = False  # an SSE answer with content-length instead of chunked
    raw: str | None = None  # send this body verbatim (cut by ``split``) instead of a completion
    content_type: str | None = None  # override the content type
    # The engine's own prefix-cache hits, as vLLM reports them: prompt_tokens_details.cached_tokens
    # (on the final usage only).
    engine_cached: int | None = None
    # Cache fields other providers write into usage (DeepSeek's, Anthropic's names).
    provider_fields: bool = False
    # Messages and Responses: which engine's usage shape ("" vLLM 0.23, "details" vLLM 0.33
    # with prompt-token details, "sglang"), the engine's own cache writes, a tool call to make.
    flavour: str = ""
    engine_written: int = 0
    tool_call: str | None = None
    tool_input: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> str:
        """The header value asking for this answer."""
        fields = dataclasses.asdict(self)
        defaults = dataclasses.asdict(Answer())
        return codec.dumps({k: v for k, v in fields.items() if v != defaults[k]}).decode()

    @classmethod
    def decode(cls, text: str | None) -> Answer:
        return cls(**codec.loads(text)) if text else cls()


@dataclass(slots=True)
class Record:
    """One request as the fake saw it, and what it sent back."""

    tag: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    sent: list[bytes] = field(default_factory=list)
    target: str = ""  # the request target (path and query) exactly as received
    finished: bool = False  # the whole answer was written
    aborted: bool = False  # the client went away or the fake reset the connection

    def to_json(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "method": self.method,
            "path": self.path,
            "headers": self.headers,
            "body": _b64(self.body),
            "sent": [_b64(c) for c in self.sent],
            "finished": self.finished,
            "aborted": self.aborted,
            "target": self.target,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(
            tag=data["tag"],
            method=data["method"],
            path=data["path"],
            headers=data["headers"],
            body=base64.b64decode(data["body"]),
            sent=[base64.b64decode(c) for c in data["sent"]],
            finished=data["finished"],
            aborted=data["aborted"],
            target=data.get("target", ""),
        )

    def json(self) -> Any:
        return codec.loads(self.body)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chat_completion(model: str, answer: Answer) -> dict[str, Any]:
    """A non-streaming chat completion as the upstream would send it."""
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.content},
                "finish_reason": "stop",
            }
        ],
    }
    if answer.usage:
        body["usage"] = usage(answer)
    return body


def usage(
    answer: Answer, completion_tokens: int | None = None, final: bool = True
) -> dict[str, Any]:
    """The usage object; ``final`` adds what engines send on the last usage only."""
    completion = answer.completion_tokens if completion_tokens is None else completion_tokens
    out: dict[str, Any] = {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": answer.prompt_tokens + completion,
    }
    if final and answer.engine_cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": answer.engine_cached}
    if answer.provider_fields:
        out |= {
            "prompt_cache_hit_tokens": 11,
            "prompt_cache_miss_tokens": answer.prompt_tokens - 11,
            "cache_read_input_tokens": 11,
            "cache_creation_input_tokens": 0,
        }
    return out


def sse_events(
    model: str, answer: Answer, include_usage: bool, continuous: bool = False
) -> list[bytes]:
    """The stream's events, each with its terminating blank line.

    ``continuous`` is vLLM's ``continuous_usage_stats``: usage on every chunk as well.
    """
    nl = "\r\n" if answer.crlf else "\n"
    sent = 0

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        value = _chunk(model, delta, finish)
        if continuous and include_usage and answer.usage:
            value["usage"] = usage(answer, sent, final=False)
        return _data(value, nl)

    events = [chunk({"role": "assistant", "content": ""}, None)]
    if answer.comment:
        events.append(f": keep-alive{nl}{nl}".encode())
    for word in _words(answer.content):
        sent += 1
        events.append(chunk({"content": word}, None))
    if answer.error_frame:
        error = {"error": {"message": "upstream failed mid-stream", "type": "server_error"}}
        events.append(_data(error, nl))
    events.append(chunk({}, "stop"))
    if include_usage and answer.usage:
        final = {**_chunk(model, None, None), "choices": [], "usage": usage(answer)}
        events.append(_data(final, nl))
    events.append(f"data: [DONE]{nl}{nl}".encode())
    return events


def _chunk(model: str, delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [] if delta is None else [choice],
    }


def _data(value: Any, nl: str) -> bytes:
    return b"data: " + codec.dumps(value) + f"{nl}{nl}".encode()


def _words(text: str) -> Iterator[str]:
    parts = text.split(" ")
    for i, part in enumerate(parts):
        yield part if i == 0 else " " + part


def split_stream(events: list[bytes], how: str) -> list[bytes]:
    """Cut the stream's bytes into the chunks the fake writes one by one."""
    data = b"".join(events)
    if how == "frames":
        return list(events)
    if how == "whole":
        return [data]
    if how.startswith("bytes:"):
        size = int(how.removeprefix("bytes:"))
        return [data[i : i + size] for i in range(0, len(data), size)]
    if how == "awkward":
        return _cut(data, sorted(set(_awkward_cuts(data))))
    raise ValueError(f"unknown split {how!r}")


def _awkward_cuts(data: bytes) -> Iterator[int]:
    """Inside every ``data:``, between every CR and LF, and in the middle of the usage JSON."""
    start = data.find(b"data:")
    while start != -1:
        yield start + 2
        start = data.find(b"data:", start + 1)
    crlf = data.find(b"\r\n")
    while crlf != -1:
        yield crlf + 1
        crlf = data.find(b"\r\n", crlf + 1)
    usage_at = data.find(b'"usage"')
    if usage_at != -1:
        yield usage_at + 4


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *[c for c in cuts if 0 < c < len(data)], len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@dataclass
class FakeUpstream:
    """The fake upstream server; ``records`` holds every request in arrival order."""

    host: str = "127.0.0.1"
    port: int = 0
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._released: dict[str, asyncio.Event] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _release_event(self, tag: str) -> asyncio.Event:
        return self._released.setdefault(tag, asyncio.Event())

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_get(f"{CONTROL}/health", self._health)
        app.router.add_get(f"{CONTROL}/requests", self._list)
        app.router.add_delete(f"{CONTROL}/requests", self._clear)
        app.router.add_post(f"{CONTROL}/release", self._release)
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        sock = socket.create_server((self.host, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    async def _list(self, request: web.Request) -> web.StreamResponse:
        tag = request.query.get("tag")
        found = [r.to_json() for r in self.records if tag is None or r.tag == tag]
        return web.Response(body=codec.dumps(found), content_type="application/json")

    async def _clear(self, request: web.Request) -> web.StreamResponse:
        self.records.clear()
        return web.json_response({"ok": True})

    async def _release(self, request: web.Request) -> web.StreamResponse:
        self._release_event(request.query["tag"]).set()
        return web.json_response({"ok": True})

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        answer = Answer.decode(request.headers.get(HEADER))
        body = await request.read()
        headers = {str(k).lower(): str(v) for k, v in request.headers.items()}
        record = Record(answer.tag, request.method, request.path, headers, body)
        record.target = request.raw_path
        self.records.append(record)
        if answer.raw is not None or not _is_llm_path(request.path):
            return await self._send_raw(request, record, answer)
        try:
            parsed = codec.loads(body)
        except codec.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            error = {"error": {"message": "body is not a JSON object", "type": "invalid_request"}}
            return await self._send(request, record, answer, [codec.dumps(error)], status=400)
        return await self._answer(request, record, answer, parsed)

    async def _answer(
        self, request: web.Request, record: Record, answer: Answer, parsed: dict[str, Any]
    ) -> web.StreamResponse:
        model = str(parsed.get("model", "unknown"))
        if engines.is_messages(request.path) or engines.is_responses(request.path):
            return await self._answer_engine(request, record, answer, parsed, model)
        if answer.status >= 300:
            error = {"error": {"message": "injected upstream error", "type": "server_error"}}
            return await self._send(request, record, answer, [codec.dumps(error)])
        if parsed.get("stream") is True:
            options = parsed.get("stream_options")
            options = options if isinstance(options, dict) else {}
            include = options.get("include_usage") is True
            continuous = options.get("continuous_usage_stats") is True
            events = sse_events(model, answer, include, continuous)
            chunks = split_stream(events, answer.split)
            return await self._send(request, record, answer, chunks, sse=True)
        return await self._send(
            request, record, answer, [codec.dumps(chat_completion(model, answer))]
        )

    async def _answer_engine(
        self,
        request: web.Request,
        record: Record,
        answer: Answer,
        parsed: dict[str, Any],
        model: str,
    ) -> web.StreamResponse:
        messages = engines.is_messages(request.path)
        if answer.status >= 300:
            error = engines.messages_error(answer) if messages else {"error": {"message": "x"}}
            return await self._send(request, record, answer, [codec.dumps(error)])
        if parsed.get("stream") is True:
            build = engines.message_events if messages else engines.response_events
            chunks = split_stream(build(model, answer), answer.split)
            return await self._send(request, record, answer, chunks, sse=True)
        body = engines.message(model, answer) if messages else engines.response(model, answer)
        return await self._send(request, record, answer, [codec.dumps(body)])

    async def _send_raw(
        self, request: web.Request, record: Record, answer: Answer
    ) -> web.StreamResponse:
        if answer.raw is not None:
            chunks = split_stream([answer.raw.encode()], answer.split)
            return await self._send(request, record, answer, chunks)
        echo = {"object": "fake.echo", "path": request.path, "received_bytes": len(record.body)}
        return await self._send(request, record, answer, [codec.dumps(echo)])

    async def _send(
        self,
        request: web.Request,
        record: Record,
        answer: Answer,
        chunks: list[bytes],
        *,
        sse: bool = False,
        status: int | None = None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=status or answer.status)
        response.content_type = answer.content_type or (
            "text/event-stream" if sse else "application/json"
        )
        if sse and not answer.sse_content_length:
            response.enable_chunked_encoding()
        else:
            response.content_length = sum(len(c) for c in chunks)
        try:
            await response.prepare(request)  # sends the headers: the client may be gone already
            await self._write(request, record, answer, response, chunks)
        except (ConnectionError, RuntimeError):
            record.aborted = True
        return response

    async def _write(
        self,
        request: web.Request,
        record: Record,
        answer: Answer,
        response: web.StreamResponse,
        chunks: list[bytes],
    ) -> None:
        for i, chunk in enumerate(chunks):
            if i and answer.chunk_delay_ms:
                await asyncio.sleep(answer.chunk_delay_ms / 1000)
            if i == answer.hold_after:
                await self._hold(answer.tag)
            if i == answer.reset_after:
                await asyncio.sleep(DRAIN_BEFORE_RESET_S)
                record.aborted = True
                reset_connection(request)
                return
            if i == answer.pause_after and await _wait_for_close(request):
                record.aborted = True
                return
            await response.write(chunk)
            record.sent.append(chunk)
        await response.write_eof()
        record.finished = True

    async def _hold(self, tag: str) -> None:
        event = self._release_event(tag)
        try:
            await asyncio.wait_for(event.wait(), MAX_PAUSE_S)
        except TimeoutError:
            pass
        finally:
            self._released.pop(tag, None)


def _is_llm_path(path: str) -> bool:
    return (
        path.endswith("/chat/completions")
        or engines.is_messages(path)
        or engines.is_responses(path)
    )


async def _wait_for_close(request: web.Request) -> bool:
    """Pause until the client's connection closes (True) or ``MAX_PAUSE_S`` passes (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MAX_PAUSE_S
    while loop.time() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            return True
        await asyncio.sleep(0.02)
    return False


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Programmable fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FakeUpstream(args.host, args.port) as upstream:
        print(f"listening on {upstream.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
