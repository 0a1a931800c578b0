"""A minimal HTTP/1.1 upstream for benchmarks: a fixed OpenAI-style JSON or SSE answer, keep-alive.

A raw asyncio protocol with no framework: it reads each request's headers and its
``content-length`` or chunked body, then writes a prebuilt answer. A body asking for
``"stream": true`` gets a chunked ``text/event-stream`` answer of ``--chunks`` content
frames, a finish frame, a usage frame and ``[DONE]``, each frame its own chunk and its own
write, ``--interval-ms`` apart (as a model server paces tokens; it also keeps the frames from
coalescing into one read in Envoy); every other request gets one JSON chat completion with a
usage object. Answers are built once at start.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

from extproc.core import codec

CREATED = 1_700_000_000
HEADER_END = b"\r\n\r\n"
STREAM_FLAGS = (b'"stream":true', b'"stream": true')


def _completion(model: str, prompt_tokens: int) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A fixed answer for benchmarks."},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 7,
            "total_tokens": prompt_tokens + 7,
        },
    }
    return codec.dumps(body)


def _chunk(model: str, delta: dict[str, str] | None, finish: str | None) -> dict[str, object]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": choices,
    }


def _frame(value: object) -> bytes:
    return b"data: " + codec.dumps(value) + b"\n\n"


def sse_frames(model: str, prompt_tokens: int, chunks: int) -> list[bytes]:
    """The stream's frames: a role frame, ``chunks`` content frames, finish, usage, [DONE]."""
    frames = [_frame(_chunk(model, {"role": "assistant", "content": ""}, None))]
    frames += [_frame(_chunk(model, {"content": f" word{i}"}, None)) for i in range(chunks)]
    frames.append(_frame(_chunk(model, {}, "stop")))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": chunks, "total_tokens": 0}
    usage["total_tokens"] = prompt_tokens + chunks
    frames.append(_frame({**_chunk(model, None, None), "usage": usage}))
    frames.append(b"data: [DONE]\n\n")
    return frames


def json_answer(body: bytes) -> bytes:
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head + body


def sse_answer(frames: list[bytes]) -> list[bytes]:
    """The head plus one HTTP chunk per frame, then the last chunk."""
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    chunks = [b"%x\r\n%b\r\n" % (len(frame), frame) for frame in frames]
    return [head + chunks[0], *chunks[1:-1], chunks[-1] + b"0\r\n\r\n"]


class Answers:
    """The prebuilt answers."""

    def __init__(self, model: str, prompt_tokens: int, chunks: int, interval_s: float) -> None:
        self.interval_s = interval_s
        self.json = json_answer(_completion(model, prompt_tokens))
        self.sse = sse_answer(sse_frames(model, prompt_tokens, chunks))


class Http(asyncio.Protocol):
    """One keep-alive connection: parse requests, write the prebuilt answer."""

    def __init__(self, answers: Answers) -> None:
        self._answers = answers
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._queue: list[bool] = []  # streamed answers still to write, in order
        self._writing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._next_request():
            pass

    def _next_request(self) -> bool:
        end = self._buffer.find(HEADER_END)
        if end < 0:
            return False
        head = bytes(self._buffer[:end]).lower()
        start = end + len(HEADER_END)
        if b"\r\ntransfer-encoding: chunked" in head:
            found = _chunked_body(self._buffer, start)
            if found is None:
                return False
            body, total = found
        else:
            total = start + _content_length(head)
            if len(self._buffer) < total:
                return False
            body = bytes(self._buffer[start:total])
        del self._buffer[:total]
        self._respond(any(flag in body for flag in STREAM_FLAGS))
        return True

    def _respond(self, stream: bool) -> None:
        assert self._transport is not None
        if not stream and not self._writing:
            self._transport.write(self._answers.json)
            return
        self._queue.append(stream)
        if not self._writing:
            self._writing = True
            asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Write queued answers in order; each SSE frame is its own write, paced."""
        assert self._transport is not None
        while self._queue:
            if not self._queue.pop(0):
                self._transport.write(self._answers.json)
                continue
            for index, part in enumerate(self._answers.sse):
                if index:
                    await asyncio.sleep(self._answers.interval_s)
                if self._transport.is_closing():
                    return
                self._transport.write(part)
        self._writing = False


def _chunked_body(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked request body starting at ``start`` and where it ends; ``None``: incomplete.

    With the request headers skipped, Envoy forwards an edited body chunked.
    """
    parts, at = [], start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(bytes(buffer[at:line_end]).split(b";", 1)[0], 16)
        data_start = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n", data_start)
            return None if trailer_end < 0 else (b"".join(parts), trailer_end + 2)
        if len(buffer) < data_start + size + 2:
            return None
        parts.append(bytes(buffer[data_start : data_start + size]))
        at = data_start + size + 2


def _content_length(head: bytes) -> int:
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    start = at + len(b"\r\ncontent-length:")
    stop = head.find(b"\r\n", start)
    return int(head[start : stop if stop >= 0 else len(head)].strip())


async def serve(port: int, answers: Answers) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: Http(answers), "127.0.0.1", port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="bench")
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--chunks", type=int, default=20, help="SSE content frames")
    parser.add_argument("--interval-ms", type=float, default=1.0, help="between SSE frames")
    args = parser.parse_args(argv)
    answers = Answers(args.model, args.prompt_tokens, args.chunks, args.interval_ms / 1000)
    asyncio.run(serve(args.port, answers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
