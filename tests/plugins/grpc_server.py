"""Pytest plugin: the real grpc.aio ext_proc server on a free port, with fake ports behind it.

``EnvoySide`` plays Envoy's half of one ``Process`` stream (builds the messages Envoy sends and
reads one reply per message). Fixtures: ``fake_ports``, ``extproc_server`` (a running server
whose commits and metrics the test can inspect).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric, NumberDataPoint

from extproc._envoy_api.envoy.config.core.v3 import base_pb2
from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.adapters import servicer
from extproc.adapters.telemetry import METER_NAME, Metrics, meter_provider
from extproc.core.classify import ClassifyPorts
from extproc.core.model import IndexHit, ModelConfig, PendingWrite, PrefixHash, PrincipalId, Scope
from extproc.core.session import SessionPolicy
from tests.fakes.ports import FakeIndex, FakeModels, FakePrincipals, FakeTokenizer

API_KEY = "sk-test"
MODEL = "m"


@dataclass
class GatedIndex:
    """A ``FakeIndex`` whose lookups and commits wait for their gate to open."""

    inner: FakeIndex = field(default_factory=FakeIndex)
    lookup_gate: asyncio.Event = field(default_factory=asyncio.Event)
    commit_gate: asyncio.Event = field(default_factory=asyncio.Event)
    lookup_started: asyncio.Event = field(default_factory=asyncio.Event)
    lookup_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    commit_started: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.lookup_gate.set()
        self.commit_gate.set()

    async def lookup(self, scope: Scope, hashes: Sequence[PrefixHash]) -> Sequence[IndexHit]:
        self.lookup_started.set()
        try:
            await self.lookup_gate.wait()
        except asyncio.CancelledError:
            self.lookup_cancelled.set()
            raise
        return await self.inner.lookup(scope, hashes)

    def due(self, pending: PendingWrite) -> bool:
        return self.inner.due(pending)

    async def commit(self, pending: PendingWrite) -> None:
        self.commit_started.set()
        await self.commit_gate.wait()
        await self.inner.commit(pending)


@dataclass
class FakePorts:
    """The fakes behind a test server: one key, one cache-enabled model, a word tokenizer."""

    principals: FakePrincipals = field(
        default_factory=lambda: FakePrincipals({API_KEY: PrincipalId("tenant-1")})
    )
    models: FakeModels = field(default_factory=lambda: FakeModels({MODEL: ModelConfig(MODEL, 1)}))
    index: GatedIndex = field(default_factory=GatedIndex)
    tokenizer: FakeTokenizer = field(default_factory=lambda: FakeTokenizer({MODEL: "words-v1"}))

    def classify_ports(self) -> ClassifyPorts:
        return ClassifyPorts(self.principals, self.models, self.index, self.tokenizer)


@dataclass
class ServerHarness:
    """A running ext_proc server and what a test inspects."""

    address: str
    ports: FakePorts
    commits: servicer.CommitTracker
    reader: InMemoryMetricReader
    channel: grpc.aio.Channel

    def stream(self) -> EnvoySide:
        stub = pb_grpc.ExternalProcessorStub(self.channel)
        return EnvoySide(stub.Process())

    def counter(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Current values of counter ``name`` by sorted label pairs."""
        values: dict[tuple[tuple[str, str], ...], float] = {}
        for metric in self._metrics(name):
            for point in metric.data.data_points:
                if isinstance(point, NumberDataPoint):
                    labels = tuple(sorted((k, str(v)) for k, v in (point.attributes or {}).items()))
                    values[labels] = point.value
        return values

    def _metrics(self, name: str) -> list[Metric]:
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [
            metric
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
        ]


def dependencies(
    ports: FakePorts, reader: InMemoryMetricReader, deadlines: servicer.Deadlines
) -> servicer.Dependencies:
    metrics = Metrics(meter_provider((reader,)).get_meter(METER_NAME))
    commits = servicer.CommitTracker(ports.index, deadlines.commit_s, metrics)
    return servicer.Dependencies(
        policy=SessionPolicy(max_body_bytes=1 << 20),
        ports=ports.classify_ports(),
        deadlines=deadlines,
        commits=commits,
        metrics=metrics,
    )


@pytest.fixture
def fake_ports() -> FakePorts:
    return FakePorts()


@pytest.fixture
def deadlines() -> servicer.Deadlines:
    """Generous deadlines, never extending a reply; tests of the deadline override this."""
    return servicer.Deadlines(classify_s=10.0, commit_s=10.0, reply_budget_s=10.0)


@pytest.fixture
async def extproc_server(
    fake_ports: FakePorts, deadlines: servicer.Deadlines
) -> AsyncIterator[ServerHarness]:
    reader = InMemoryMetricReader()
    deps = dependencies(fake_ports, reader, deadlines)
    server = grpc.aio.server()
    servicer.add_to_server(servicer.ExternalProcessor(deps), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield ServerHarness(address, fake_ports, deps.commits, reader, channel)
    finally:
        await channel.close()
        await server.stop(None)
        await deps.commits.drain(0)


# ---- Envoy's side of one stream ----

_Call = grpc.aio.StreamStreamCall[pb.ProcessingRequest, pb.ProcessingResponse]


class EnvoySide:
    """Sends what Envoy sends and reads exactly one reply per message."""

    def __init__(self, call: _Call) -> None:
        self.call = call

    async def send(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        await self.call.write(request)
        reply = await self.call.read()
        assert isinstance(reply, pb.ProcessingResponse), reply
        return reply

    async def request_headers(
        self, path: str = "/v1/chat/completions", method: str = "POST", **headers: str
    ) -> pb.ProcessingResponse:
        pairs = {":path": path, ":method": method, ":authority": "llm", **headers}
        request = pb.ProcessingRequest(request_headers=http_headers(pairs))
        return await self.send(request)

    async def request_body(self, body: bytes) -> pb.ProcessingResponse:
        request = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
        return await self.send(request)

    async def response_headers(
        self, status: int = 200, content_type: str = "application/json", eos: bool = False
    ) -> pb.ProcessingResponse:
        pairs = {":status": str(status), "content-type": content_type, "content-length": "10"}
        return await self.send(pb.ProcessingRequest(response_headers=http_headers(pairs, eos)))

    async def response_body(self, chunk: bytes, eos: bool = False) -> pb.ProcessingResponse:
        request = pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=eos))
        return await self.send(request)

    async def read(self) -> pb.ProcessingResponse:
        """One more message from the server (after one that only extended the timer)."""
        reply = await self.call.read()
        assert isinstance(reply, pb.ProcessingResponse), reply
        return reply

    async def finish(self) -> None:
        """Half-close like Envoy after the last message, and read the server's end."""
        await self.call.done_writing()
        assert await self.call.read() is grpc.aio.EOF

    def cancel(self) -> None:
        self.call.cancel()


def http_headers(pairs: dict[str, str], eos: bool = False) -> pb.HttpHeaders:
    headers = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=headers), end_of_stream=eos)


def bearer(key: str = API_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}
