"""The reference point of DESIGN §11: a grpc.aio ext_proc server that changes nothing.

It parses every ``ProcessingRequest`` and answers each with a prebuilt, preserialised CONTINUE
of the matching kind. To see the same messages as the real server, its response-headers reply
switches the response body to ``BUFFERED`` (``--response-mode buffered``, JSON answers) or
``STREAMED`` (``streamed``, SSE answers; ``content-length`` removed), the two overrides the
shipped bootstrap allows. So a JSON request costs 4 messages and a streamed one 3 plus one per
body chunk. ``--response-mode none`` leaves the response body alone (3 messages per request),
which shows what one message costs.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import grpc

from extproc._envoy_api.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
PHASES = (
    "request_headers",
    "request_body",
    "request_trailers",
    "response_headers",
    "response_body",
    "response_trailers",
)
_Mode = processing_mode_pb2.ProcessingMode
_Context = grpc.aio.ServicerContext[pb.ProcessingRequest, bytes]


def _continue(phase: str) -> pb.ProcessingResponse:
    reply = pb.ProcessingResponse()
    getattr(reply, phase).SetInParent()
    return reply


def _response_headers(mode_name: str) -> pb.ProcessingResponse:
    reply = _continue("response_headers")
    if mode_name == "none":
        return reply
    streamed = mode_name == "streamed"
    mode = reply.mode_override
    mode.request_body_mode = _Mode.NONE
    mode.response_header_mode = _Mode.SEND
    mode.response_body_mode = _Mode.STREAMED if streamed else _Mode.BUFFERED
    mode.request_trailer_mode = _Mode.SKIP
    mode.response_trailer_mode = _Mode.SKIP
    if streamed:
        reply.response_headers.response.header_mutation.remove_headers.append("content-length")
    return reply


def replies(mode_name: str) -> dict[str, bytes]:
    """The serialised reply for each kind of message."""
    built = {phase: _continue(phase) for phase in PHASES}
    built["response_headers"] = _response_headers(mode_name)
    return {phase: reply.SerializeToString() for phase, reply in built.items()}


def handler(answers: dict[str, bytes]) -> grpc.RpcMethodHandler[pb.ProcessingRequest, bytes]:
    async def process(
        requests: AsyncIterator[pb.ProcessingRequest], _context: _Context
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield answers[request.WhichOneof("request") or "request_headers"]

    return grpc.stream_stream_rpc_method_handler(
        process,
        request_deserializer=pb.ProcessingRequest.FromString,
        response_serializer=bytes,
    )


async def serve(port: int, mode_name: str) -> None:
    server = grpc.aio.server()
    methods = {"Process": handler(replies(mode_name))}
    generic = grpc.method_handlers_generic_handler(SERVICE, methods)
    server.add_generic_rpc_handlers((generic,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--response-mode", choices=("buffered", "streamed", "none"), default="buffered"
    )
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.response_mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
