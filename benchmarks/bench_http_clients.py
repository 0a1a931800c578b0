"""Client-side CPU per call of the HTTP clients extproc could use for the tokenizer service.

``http1`` is extproc's own (``extproc.adapters.http1``), the one the server uses; the others
are the clients at hand in the dev and test dependencies.

Each client posts a ~16 KB JSON body (what one tokenize call of a 16 KB prompt carries) to
``fast_upstream.py`` (a raw asyncio server in its own process, so its CPU is not counted) over
keep-alive connections, at 1 and at ``--concurrency`` calls in flight. The figure is this
process's CPU time (user + system, every thread) per call, best of ``--rounds`` rounds::

    .venv/bin/python benchmarks/bench_http_clients.py --calls 3000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from extproc.core import codec

HERE = Path(__file__).resolve().parent
Call = Callable[[], Awaitable[bytes]]


def tokenize_body(size: int) -> bytes:
    segment = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:size]
    return codec.dumps({"virtual_model": "m", "segments": [segment, "Summarise."]})


@contextlib.asynccontextmanager
async def httpx_client(url: str, body: bytes) -> AsyncIterator[Call]:
    import httpx

    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=5.0, headers=headers) as client:

        async def call() -> bytes:
            response = await client.request("POST", "/v1/tokenize", content=body)
            return response.content

        yield call


@contextlib.asynccontextmanager
async def httpcore_client(url: str, body: bytes) -> AsyncIterator[Call]:
    import httpcore

    headers = [(b"content-type", b"application/json")]
    target = url.encode() + b"/v1/tokenize"
    async with httpcore.AsyncConnectionPool(max_connections=100) as pool:

        async def call() -> bytes:
            response = await pool.request(b"POST", target, headers=headers, content=body)
            return response.content

        yield call


@contextlib.asynccontextmanager
async def aiohttp_client(url: str, body: bytes) -> AsyncIterator[Call]:
    import aiohttp

    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(base_url=url, headers=headers) as session:

        async def call() -> bytes:
            async with session.post("/v1/tokenize", data=body) as response:
                return await response.read()

        yield call


@contextlib.asynccontextmanager
async def http1_client(url: str, body: bytes) -> AsyncIterator[Call]:
    from extproc.adapters.http1 import Http1Client

    client = Http1Client(url, connect=5.0, total=5.0, headers={"content-type": "application/json"})

    async def call() -> bytes:
        return (await client.request("POST", "/v1/tokenize", body)).body

    try:
        yield call
    finally:
        await client.aclose()


CLIENTS: dict[str, Callable[[str, bytes], contextlib.AbstractAsyncContextManager[Call]]] = {
    "httpx": httpx_client,
    "httpcore": httpcore_client,
    "aiohttp": aiohttp_client,
    "http1": http1_client,
}


async def cpu_per_call(call: Call, calls: int, concurrency: int) -> float:
    """Milliseconds of this process's CPU per call, ``concurrency`` calls in flight."""
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - started) * 1000 / calls


async def measure(name: str, url: str, args: argparse.Namespace) -> dict[str, float]:
    body = tokenize_body(args.body_kb * 1024)
    best: dict[str, float] = {}
    async with CLIENTS[name](url, body) as call:
        for _ in range(50):
            await call()  # warm up: connections open, code paths hot
        for concurrency in (1, args.concurrency):
            key = f"{concurrency} in flight"
            runs = [await cpu_per_call(call, args.calls, concurrency) for _ in range(args.rounds)]
            best[key] = min(runs)
    return best


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    command = [sys.executable, str(HERE / "fast_upstream.py"), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    return process, "http://" + line.split()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--body-kb", type=int, default=16)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    args = parser.parse_args(argv)
    server, url = start_server()
    try:
        results: dict[str, Any] = {}
        for name in args.clients.split(","):
            results[name] = asyncio.run(measure(name, url, args))
            figures = ", ".join(f"{k}: {v:.3f} ms" for k, v in results[name].items())
            print(f"{name:9} CPU per call  {figures}", flush=True)
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
