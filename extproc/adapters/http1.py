"""A small HTTP/1.1 client for one service: keep-alive connections on asyncio streams.

It is what the tokenizer-service client needs and nothing more: requests to one origin
(``http://`` or ``https://``), a body sent with ``Content-Length``, an answer read whole
(``Content-Length``, chunked, or until the server closes). Of the clients measured in
``benchmarks/bench_http_clients.py`` it costs the least CPU a call.

Rules:
* idle connections are kept (at most ``idle``) and reused; one the server has closed is
  dropped when it is taken;
* at most ``limit`` connections are open at once; a call beyond that waits for one;
* a call that fails on a reused connection before any byte of the answer arrives (the server
  closed it while it sat idle) is sent once more on a new connection; nothing else is retried;
* ``connect`` bounds opening a connection, ``total`` the whole call, waiting included;
* an answer larger than ``max_body``, a header block over ``max_head`` or an answer that is not
  HTTP/1.x is refused;
* every failure is an ``HttpError`` whose ``reason`` is one of ``timed out``, ``cannot
  connect``, ``connection lost``, ``malformed answer`` or ``closed``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from typing import NamedTuple
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024


class HttpError(Exception):
    """One call failed; ``reason`` says how, in a word or three."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Stale(Exception):
    """A reused connection failed before the answer began."""


class Answer(NamedTuple):
    status: int
    body: bytes


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Http1Client:
    """Calls to the origin of ``base_url`` over a pool of keep-alive connections."""

    def __init__(
        self,
        base_url: str,
        *,
        connect: float,
        total: float,
        headers: dict[str, str] | None = None,
        limit: int = 64,
        idle: int = 16,
        max_head: int = MAX_HEAD,
        max_body: int = MAX_BODY,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        # https: the system's trust store (SSL_CERT_FILE / SSL_CERT_DIR name a private CA).
        self._ssl: ssl.SSLContext | None = (
            (tls or ssl.create_default_context()) if url.scheme == "https" else None
        )
        self._prefix = url.path.rstrip("/")
        authority = url.netloc.rpartition("@")[2]
        fixed = {"host": authority, **{k.lower(): v for k, v in (headers or {}).items()}}
        self._head = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._connect = connect
        self._total = total
        self._slots = asyncio.Semaphore(limit)
        self._idle: collections.deque[_Conn] = collections.deque()
        self._idle_max = idle
        self._max_head = max_head
        self._max_body = max_body
        self._closed = False

    async def request(self, method: str, path: str, body: bytes | None = None) -> Answer:
        """Send one request for ``path`` (below the base URL's path) and read its answer."""
        if self._closed:
            raise HttpError("closed")
        payload = body or b""
        head = (
            f"{method} {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1")
            + self._head
            + b"content-length: %d\r\n\r\n" % len(payload)
        )
        try:
            async with asyncio.timeout(self._total), self._slots:
                conn = self._take()
                if conn is not None:
                    try:
                        return await self._exchange(conn, head, payload, reused=True)
                    except _Stale:
                        pass
                return await self._exchange(await self._open(), head, payload, reused=False)
        except TimeoutError:
            raise HttpError("timed out") from None

    async def aclose(self) -> None:
        """Close every idle connection; calls after this fail with ``closed``."""
        self._closed = True
        closing = [writer for _, writer in self._idle]
        self._idle.clear()
        for writer in closing:
            writer.close()
        for writer in closing:
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    def _take(self) -> _Conn | None:
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    def _give_back(self, conn: _Conn) -> None:
        if self._closed or len(self._idle) >= self._idle_max:
            conn[1].close()
        else:
            self._idle.append(conn)

    async def _open(self) -> _Conn:
        try:
            async with asyncio.timeout(self._connect):
                return await asyncio.open_connection(
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    limit=self._max_head,
                )
        except TimeoutError:
            raise HttpError("timed out") from None
        except (OSError, ssl.SSLError):
            raise HttpError("cannot connect") from None

    async def _exchange(self, conn: _Conn, head: bytes, payload: bytes, reused: bool) -> Answer:
        reader, writer = conn
        keep = False
        try:
            writer.write(head + payload)
            try:
                block = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if reused and not getattr(exc, "partial", b""):
                    raise _Stale from None
                raise HttpError("connection lost") from None
            answer, keep = await self._read_answer(reader, block)
            return answer
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            raise HttpError("connection lost") from None
        except asyncio.LimitOverrunError:
            raise HttpError("malformed answer") from None
        finally:
            if keep:
                self._give_back(conn)
            else:
                writer.close()

    async def _read_answer(self, reader: asyncio.StreamReader, block: bytes) -> tuple[Answer, bool]:
        """The answer whose head is ``block``, and whether the connection may be reused."""
        lines = block.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() or code < b"200":
            raise HttpError("malformed answer")  # not HTTP/1.x, or informational (not expected)
        status = int(code)
        length: int | None = None
        chunked = False
        keep = version == b"HTTP/1.1"
        for raw in lines[1:]:
            if not raw:
                continue
            name, sep, value = raw.partition(b":")
            if not sep:
                raise HttpError("malformed answer")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise HttpError("malformed answer")
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif name == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")}
                keep = b"close" not in tokens and (keep or b"keep-alive" in tokens)
        if status in (204, 304):
            return Answer(status, b""), keep
        if chunked:
            return Answer(status, await self._read_chunks(reader)), keep
        if length is not None:
            if length > self._max_body:
                raise HttpError("malformed answer")
            return Answer(status, await reader.readexactly(length)), keep
        return Answer(status, await self._read_to_end(reader)), False

    async def _read_to_end(self, reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        total = 0
        while chunk := await reader.read(self._max_body + 1 - total):
            parts.append(chunk)
            total += len(chunk)
            if total > self._max_body:
                raise HttpError("malformed answer")
        return b"".join(parts)

    async def _read_chunks(self, reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size_text = size_line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError("malformed answer") from None
            if size < 0 or total + size > self._max_body:
                raise HttpError("malformed answer")
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers, ignored
                return b"".join(parts)
            chunk = await reader.readexactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise HttpError("malformed answer")
            parts.append(chunk[:-2])
            total += size
