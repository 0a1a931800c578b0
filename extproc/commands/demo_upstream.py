"""``extproc demo-upstream``: run the built-in demo LLM upstream until stopped."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from extproc.devtools.upstream import UpstreamSettings, bound_port, start_upstream


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo-upstream",
        help="run the built-in demo LLM upstream (no model)",
        description="Serve POST /v1/chat/completions, /v1/messages (Anthropic) and "
        "/v1/responses (OpenAI Responses), each JSON or SSE, GET /v1/models and "
        "GET /health with a canned answer and realistic usage. prompt_tokens comes from "
        "--tokenizer when given, else from a byte estimate (one token per four bytes).",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", 8000),
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:8000; port 0 picks a free one)",
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="model name listed by /v1/models (repeatable; default: demo)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        metavar="TOKENIZER_JSON",
        help="Hugging Face tokenizer.json used to count prompt and completion tokens",
    )
    parser.set_defaults(func=run)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[addr]:port``) into a host and a port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def run(args: argparse.Namespace) -> int:
    settings = UpstreamSettings(models=tuple(args.models or ("demo",)), tokenizer=args.tokenizer)
    host, port = args.listen
    asyncio.run(serve(settings, host, port))
    return 0


async def serve(settings: UpstreamSettings, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = await start_upstream(settings, host, port)
    try:
        print(f"demo upstream listening on http://{host}:{bound_port(runner)}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
    print("demo upstream stopped", file=sys.stderr, flush=True)
