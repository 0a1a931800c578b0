"""The HTTP/1.1 client against a raw server that answers exactly the bytes a test scripts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import trustme

from extproc.adapters.http1 import Http1Client, HttpError

Script = Callable[[bytes, int], bytes | None]  # (request head, connection's nth request) -> bytes


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@dataclass
class RawServer:
    """Reads one request at a time (head and ``content-length`` body) and writes what the
    script says; ``None`` from the script resets the connection."""

    script: Script
    close_after: int | None = None  # close each connection after this many answers
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                answer = self.script(head, served)
                served += 1
                if answer is None:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    self.open_now -= 1
                    return
                writer.write(answer)
                await writer.drain()
                if self.close_after is not None and served >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        self.open_now -= 1
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def serving(script: Script, close_after: int | None = None) -> AsyncIterator[RawServer]:
    raw = RawServer(script, close_after)
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    raw.port = server.sockets[0].getsockname()[1]
    async with server:
        yield raw
        server.close()
        # The client has closed its connections: every handler sees the end and closes too.
        await asyncio.wait_for(asyncio.gather(*raw.handlers), 2.0)


def client(raw: RawServer, path: str = "", **kwargs) -> Http1Client:
    options = {"connect": 1.0, "total": 1.0} | kwargs
    return Http1Client(f"http://127.0.0.1:{raw.port}{path}", **options)


async def test_a_request_carries_its_body_host_and_fixed_headers():
    async with serving(lambda head, n: _ok(b'{"ok":true}')) as raw:
        http = client(raw, "/base/", headers={"Content-Type": "application/json"})
        answer = await http.request("POST", "/v1/tokenize", b'{"x":1}')
        await http.aclose()
    assert answer == (200, b'{"ok":true}')
    sent = raw.requests[0]
    assert sent.startswith(b"POST /base/v1/tokenize HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{raw.port}\r\n".encode() in sent
    assert b"content-type: application/json\r\n" in sent
    assert sent.endswith(b'content-length: 7\r\n\r\n{"x":1}')


async def test_connections_are_kept_alive_and_reused():
    async with serving(lambda head, n: _ok(b"%d" % n)) as raw:
        http = client(raw)
        bodies = [(await http.request("GET", "/v1/models")).body for _ in range(5)]
        await http.aclose()
    assert bodies == [b"0", b"1", b"2", b"3", b"4"]
    assert raw.connections == 1


async def test_concurrent_calls_open_at_most_limit_and_keep_at_most_idle():
    async with serving(lambda head, n: _ok(b"x")) as raw:
        http = client(raw, limit=3, idle=2)
        answers = await asyncio.gather(*(http.request("GET", "/") for _ in range(12)))
        assert {a.status for a in answers} == {200}
        assert raw.most_open <= 3
        assert len(http._idle) <= 2
        await http.aclose()
        assert not http._idle


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\ntrailer: x\r\n\r\n",
            b"abcdefg",
            id="chunked-with-extension-and-trailer",
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", b"", id="no-content"),
        pytest.param(_ok(b"", b"x-empty: 1\r\n"), b"", id="empty-body"),
        pytest.param(_ok(b"abc", b"Content-Length: 3\r\n"), b"abc", id="repeated-equal-length"),
    ],
)
async def test_answer_framings_are_read_and_the_connection_reused(answer, body):
    async with serving(lambda head, n: answer) as raw:
        http = client(raw)
        first = await http.request("GET", "/")
        second = await http.request("GET", "/")
        await http.aclose()
    assert first.body == second.body == body
    assert raw.connections == 1


async def test_an_answer_read_to_the_close_is_whole_and_not_reused():
    answer = b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n" + b"y" * 100_000
    async with serving(lambda head, n: answer, close_after=1) as raw:
        http = client(raw)
        assert (await http.request("GET", "/")).body == b"y" * 100_000
        assert (await http.request("GET", "/")).body == b"y" * 100_000
        await http.aclose()
    assert raw.connections == 2


async def test_connection_close_is_honoured():
    async with serving(lambda head, n: _ok(b"z", b"Connection: close\r\n"), close_after=1) as raw:
        http = client(raw)
        for _ in range(3):
            assert (await http.request("GET", "/")).body == b"z"
        await http.aclose()
    assert raw.connections == 3


async def test_a_connection_the_server_closed_while_idle_is_replaced_silently():
    async with serving(lambda head, n: _ok(b"k"), close_after=1) as raw:
        http = client(raw)
        assert (await http.request("GET", "/")).body == b"k"
        await asyncio.sleep(0.05)  # the server's close arrives: the idle connection is at EOF
        assert (await http.request("GET", "/")).body == b"k"
        await http.aclose()
    assert raw.connections == 2


async def test_a_reused_connection_reset_before_the_answer_is_sent_once_more():
    # The first connection answers once, then resets on its second request, as a server that
    # timed the idle connection out just as it was reused.
    async with serving(lambda head, n: _ok(b"r") if n == 0 else None) as raw:
        http = client(raw)
        assert (await http.request("POST", "/", b"1")).body == b"r"
        assert (await http.request("POST", "/", b"2")).body == b"r"
        await http.aclose()
    assert raw.connections == 2
    assert len(raw.requests) == 3


async def test_a_new_connection_reset_is_connection_lost_and_not_retried():
    async with serving(lambda head, n: None) as raw:
        http = client(raw)
        with pytest.raises(HttpError, match="connection lost"):
            await http.request("POST", "/", b"1")
        await http.aclose()
    assert len(raw.requests) == 1


async def test_a_reset_in_the_middle_of_an_answer_is_connection_lost_and_not_retried():
    truncated = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part"

    def script(head: bytes, n: int) -> bytes:
        return _ok(b"a") if n == 0 else truncated

    async with serving(script, close_after=2) as raw:
        http = client(raw)
        await http.request("GET", "/")
        with pytest.raises(HttpError, match="connection lost"):
            await http.request("GET", "/")
        await http.aclose()
    assert len(raw.requests) == 2


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"SPDY/3 200 OK\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 OK\r\n\r\n", id="no-status-code"),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n", id="informational"),
        pytest.param(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", id="bad-header-line"),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", id="negative-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            id="conflicting-lengths",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk-size"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabcd\r\n0\r\n\r\n",
            id="chunk-longer-than-its-size",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 2000\r\n\r\n", id="length-over-limit"),
        pytest.param(b"HTTP/1.1 200 OK\r\nx: " + b"h" * 5000 + b"\r\n\r\n", id="head-over-limit"),
    ],
)
async def test_malformed_answers_are_refused(answer):
    async with serving(lambda head, n: answer, close_after=1) as raw:
        http = client(raw, max_body=1000, max_head=4096)
        with pytest.raises(HttpError, match="malformed answer"):
            await http.request("GET", "/")
        await http.aclose()


async def test_a_body_read_to_the_close_over_the_limit_is_refused():
    answer = b"HTTP/1.0 200 OK\r\n\r\n" + b"b" * 5000
    async with serving(lambda head, n: answer, close_after=1) as raw:
        http = client(raw, max_body=1000)
        with pytest.raises(HttpError, match="malformed answer"):
            await http.request("GET", "/")
        await http.aclose()


async def test_a_server_that_never_answers_times_out_within_total():
    ended = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()
        await writer.wait_closed()
        ended.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        http = Http1Client(f"http://127.0.0.1:{port}", connect=1.0, total=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(HttpError, match="timed out"):
            await http.request("GET", "/")
        assert loop.time() - started < 1.0
        assert not http._idle
        await http.aclose()
        await asyncio.wait_for(ended.wait(), 2.0)  # the timed-out call's connection was closed


async def test_nothing_listening_cannot_connect():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    http = Http1Client(f"http://127.0.0.1:{port}", connect=0.5, total=0.5)
    with pytest.raises(HttpError, match="cannot connect"):
        await http.request("GET", "/")


async def test_a_closed_client_refuses_calls():
    async with serving(lambda head, n: _ok(b"c")) as raw:
        http = client(raw)
        await http.request("GET", "/")
        await http.aclose()
        with pytest.raises(HttpError, match="closed"):
            await http.request("GET", "/")


@pytest.mark.parametrize("url", ["ftp://host/", "http://", "localhost:8080"])
def test_only_http_urls_are_taken(url):
    with pytest.raises(ValueError, match="http"):
        Http1Client(url, connect=1.0, total=1.0)


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


async def _tls_server(authority: trustme.CA, answer: bytes) -> tuple[asyncio.Server, RawServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    raw = RawServer(lambda head, n: answer)
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0, ssl=context)
    raw.port = server.sockets[0].getsockname()[1]
    return server, raw


async def test_https_verifies_the_service_and_keeps_the_connection(authority):
    server, raw = await _tls_server(authority, _ok(b"secure"))
    async with server:
        trusted = ssl.create_default_context()
        authority.configure_trust(trusted)
        http = Http1Client(f"https://127.0.0.1:{raw.port}", connect=2.0, total=2.0, tls=trusted)
        assert (await http.request("POST", "/v1/tokenize", b"{}")).body == b"secure"
        assert (await http.request("POST", "/v1/tokenize", b"{}")).body == b"secure"
        await http.aclose()
        server.close()
        await asyncio.wait_for(asyncio.gather(*raw.handlers), 2.0)
    assert raw.connections == 1


async def test_https_refuses_a_service_it_cannot_verify(authority):
    server, raw = await _tls_server(authority, _ok(b"secure"))
    async with server:
        http = Http1Client(f"https://127.0.0.1:{raw.port}", connect=2.0, total=2.0)
        with pytest.raises(HttpError, match="cannot connect"):
            await http.request("GET", "/")
        await http.aclose()
        server.close()
    assert raw.requests == []
