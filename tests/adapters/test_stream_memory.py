"""What one stream holds once it is classified: not the request body, nor its blocks."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.adapters import servicer
from extproc.core import codec
from tests.plugins.grpc_server import MODEL, FakePorts, bearer, dependencies, http_headers

BODY_BYTES = 600_000  # within the test server's 1 MiB body limit
ROLE = b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'


def marked_stream_body() -> bytes:
    words = " ".join(f"w{i}" for i in range(BODY_BYTES // 8))
    block = {"type": "text", "text": words, "cache_control": {"type": "ephemeral"}}
    messages = [{"role": "system", "content": [block]}, {"role": "user", "content": "hi"}]
    return codec.dumps({"model": MODEL, "stream": True, "messages": messages})


async def replied(pump: servicer.Pump, message: pb.ProcessingRequest) -> None:
    await pump.answer(message)
    pump.settle()


async def test_a_stream_holds_little_once_classified(fake_ports: FakePorts) -> None:
    deps = dependencies(fake_ports, InMemoryMetricReader(), servicer.Deadlines(10, 10))
    sent: list[bytes] = []

    async def send(extension: bytes) -> None:
        sent.append(extension)

    pump = servicer.Pump(deps, send)
    pairs = {":path": "/v1/chat/completions", ":method": "POST", **bearer()}
    await replied(pump, pb.ProcessingRequest(request_headers=http_headers(pairs)))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        body = pb.HttpBody(body=marked_stream_body(), end_of_stream=True)
        await replied(pump, pb.ProcessingRequest(request_body=body))
        del body
        await asyncio.wait_for(fake_ports.index.lookup_started.wait(), 10)
        for _ in range(20):  # let the classification finish (the fakes answer at once)
            await asyncio.sleep(0)
        sse = {":status": "200", "content-type": "text/event-stream"}
        await replied(pump, pb.ProcessingRequest(response_headers=http_headers(sse)))
        await replied(pump, pb.ProcessingRequest(response_body=pb.HttpBody(body=ROLE)))
        assert len(fake_ports.tokenizer.counts) == 1  # the write was classified
        fake_ports.tokenizer.counts.clear()  # the fake's own record of the texts it counted
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        pump.close()
    assert held < BODY_BYTES // 10, f"{held} bytes held by a stream past its classification"
