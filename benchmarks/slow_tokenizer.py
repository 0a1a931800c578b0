"""A tokenizer service that answers every tokenize call late, with the real counts.

Run by ``bench_proxy.py --stream`` for its ``slow`` path: classification then takes at least
``--delay-s`` seconds, and the stream's first bytes must not wait for it. It speaks the
tokenizer-service contract (``GET /v1/models``, ``POST /v1/tokenize``) for one alias, with the
counts and version of a real ``tokenizer.json``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aiohttp import web

from extproc.adapters.tokenizers import count_tokens, load_tokenizer_file
from extproc.core import codec


def app(alias: str, tokenizer: Path, delay_s: float) -> web.Application:
    loaded = load_tokenizer_file(tokenizer)

    async def models(_request: web.Request) -> web.Response:
        entry = {"alias": alias, "hf_repo": "local", "tokenizer_version": loaded.version}
        return web.json_response({"models": [entry]})

    async def tokenize(request: web.Request) -> web.Response:
        body = codec.loads(await request.read())
        await asyncio.sleep(delay_s)
        counts = count_tokens(loaded.encoder, list(body["segments"]))
        running, cumulative = 0, []
        for count in counts:
            running += count
            cumulative.append(running)
        answer = {
            "virtual_model": alias,
            "tokenizer_version": loaded.version,
            "segment_counts": list(counts),
            "cumulative": cumulative,
            "total": running,
        }
        return web.json_response(answer)

    application = web.Application(client_max_size=64 << 20)
    application.router.add_get("/v1/models", models)
    application.router.add_post("/v1/tokenize", tokenize)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--alias", required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--delay-s", type=float, default=2.0)
    args = parser.parse_args()
    web.run_app(
        app(args.alias, args.tokenizer, args.delay_s),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
