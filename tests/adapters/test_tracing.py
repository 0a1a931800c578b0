"""Traces: off unless OTEL_* configure OTLP; one span per stream, parented to the caller's trace.

The stream runs through the real grpc.aio server with the real PostgreSQL index (its lookups
and commits make their own spans); spans are read from the SDK's in-memory exporter.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from psycopg_pool import AsyncConnectionPool

from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.adapters import proto, servicer, tracing
from extproc.adapters.pg_index import PgPrefixIndex
from extproc.adapters.telemetry import METER_NAME, Metrics, TimedTokenizer, meter_provider
from extproc.core import codec
from extproc.core.classify import ClassifyPorts
from extproc.core.session import SessionPolicy
from tests.plugins.grpc_server import API_KEY, MODEL, EnvoySide, FakePorts, http_headers

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        pytest.param({}, False, id="nothing-set"),
        pytest.param({"OTEL_SERVICE_NAME": "x"}, False, id="service-name-only"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True, id="endpoint"),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c"}, True, id="traces-endpoint"
        ),
        pytest.param({"OTEL_TRACES_EXPORTER": "otlp"}, True, id="exporter-otlp"),
        pytest.param(
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"},
            False,
            id="exporter-none",
        ),
        pytest.param(
            {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False, id="disabled"
        ),
    ],
)
def test_tracing_is_on_only_when_configured(env: dict[str, str], enabled: bool) -> None:
    assert tracing.is_enabled(env) is enabled
    if not enabled:
        assert tracing.tracer_from_env(env) is None


def test_an_otlp_endpoint_builds_the_otlp_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    setup = tracing.tracer_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert setup is not None
    try:
        assert setup.provider.resource.attributes["service.name"] == "extproc"
    finally:
        setup.provider.shutdown()


def test_an_unknown_protocol_is_refused() -> None:
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}
    with pytest.raises(tracing.TracingConfigError, match="carrier-pigeon"):
        tracing.tracer_from_env(env)


def test_metrics_without_a_tracer_time_without_spans() -> None:
    metrics = Metrics(meter_provider(()).get_meter(METER_NAME))
    assert metrics.tracer is None
    assert type(metrics.timed("commit")).__name__ == "Timer"


class Traced:
    """A server whose spans go to an in-memory exporter."""

    def __init__(self, address: str, exporter: InMemorySpanExporter, setup: tracing.TracerSetup):
        self.address = address
        self.exporter = exporter
        self.setup = setup

    def spans(self) -> dict[str, ReadableSpan]:
        self.setup.provider.force_flush()
        found = self.exporter.get_finished_spans()
        by_name = {span.name: span for span in found}
        assert len(by_name) == len(found), [s.name for s in found]
        return by_name


@pytest.fixture
async def traced(pg_pool: AsyncConnectionPool) -> AsyncIterator[tuple[Traced, grpc.aio.Channel]]:
    exporter = InMemorySpanExporter()
    setup = tracing.tracer_with(exporter)
    metrics = Metrics(meter_provider((InMemoryMetricReader(),)).get_meter(METER_NAME), setup.tracer)
    fakes = FakePorts()
    index = PgPrefixIndex(pg_pool, timed=metrics.timed)
    ports = ClassifyPorts(
        fakes.principals, fakes.models, index, TimedTokenizer(fakes.tokenizer, metrics)
    )
    deadlines = servicer.Deadlines(classify_s=10.0, commit_s=10.0, reply_budget_s=10.0)
    commits = servicer.CommitTracker(index, deadlines.commit_s, metrics)
    deps = servicer.Dependencies(
        SessionPolicy(max_body_bytes=1 << 20), ports, deadlines, commits, metrics
    )
    server = grpc.aio.server()
    servicer.add_to_server(servicer.ExternalProcessor(deps), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Traced(f"127.0.0.1:{port}", exporter, setup), channel
        await commits.drain(10)
    finally:
        await channel.close()
        await server.stop(None)
        await index.aclose()
        setup.shutdown()


def _body_first(traceparent: str | None) -> pb.ProcessingRequest:
    body = {
        "model": MODEL,
        "messages": [
            {
                "role": "system",
                "content": [
                    {"type": "text", "text": "a b c d", "cache_control": {"type": "ephemeral"}}
                ],
            },
            {"role": "user", "content": "hello"},
        ],
    }
    attributes = {
        "request.path": "/v1/chat/completions",
        "request.method": "POST",
        "request.id": "req-42",
        "request.headers['authorization']": f"Bearer {API_KEY}",
    }
    if traceparent is not None:
        attributes["request.headers['traceparent']"] = traceparent
    request = pb.ProcessingRequest(
        request_body=pb.HttpBody(body=codec.dumps(body), end_of_stream=True)
    )
    fields = struct_pb2.Struct()
    fields.update(attributes)
    request.attributes[proto.FILTER_NAME].CopyFrom(fields)
    return request


ANSWER = codec.dumps({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 1}})


async def _one_stream(channel: grpc.aio.Channel, traceparent: str | None) -> None:
    side = EnvoySide(pb_grpc.ExternalProcessorStub(channel).Process())
    await side.send(_body_first(traceparent))
    await side.response_headers()
    reply = await side.response_body(ANSWER, eos=True)
    assert reply.dynamic_metadata.fields["extproc.prompt_cache"].struct_value["commit"] == (
        "scheduled"
    )
    await side.finish()


async def test_one_span_per_stream_parented_to_the_callers_trace(
    traced: tuple[Traced, grpc.aio.Channel],
) -> None:
    server, channel = traced
    await _one_stream(channel, TRACEPARENT)
    await servicer_drained(server)
    spans = server.spans()

    stream = spans[tracing.STREAM_SPAN]
    assert stream.kind is SpanKind.SERVER
    assert stream.parent is not None
    assert (f"{stream.context.trace_id:032x}", f"{stream.parent.span_id:016x}") == (
        TRACE_ID,
        PARENT_ID,
    )
    assert stream.attributes is not None
    assert stream.attributes["extproc.request_id"] == "req-42"
    assert stream.attributes["extproc.outcome"] == "create_only"
    assert stream.attributes["extproc.commit"] == "scheduled"
    classify, commit = spans["classify"], spans["commit"]
    for child in (classify, commit):
        assert child.parent is not None
        assert child.parent.span_id == stream.context.span_id
    for step in ("index lookup", "tokenize"):
        parent = spans[step].parent
        assert parent is not None
        assert parent.span_id == classify.context.span_id
    assert {s.context.trace_id for s in spans.values()} == {stream.context.trace_id}
    text = str([dict(s.attributes or {}) for s in spans.values()])
    assert API_KEY not in text
    assert "a b c d" not in text


async def test_without_traceparent_the_stream_starts_a_trace(
    traced: tuple[Traced, grpc.aio.Channel],
) -> None:
    server, channel = traced
    await _one_stream(channel, None)
    await servicer_drained(server)
    stream = server.spans()[tracing.STREAM_SPAN]

    assert stream.parent is None


async def servicer_drained(server: Traced) -> None:
    """Wait until the commit span ended (the commit runs after the reply)."""
    for _ in range(1000):
        server.setup.provider.force_flush()
        if any(s.name == "commit" for s in server.exporter.get_finished_spans()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the commit never finished")


def test_the_trace_context_comes_from_the_request_headers_too() -> None:
    headers = http_headers({":path": "/v1/chat/completions", "traceparent": TRACEPARENT})
    request = pb.ProcessingRequest(request_headers=headers)

    assert proto.trace_carrier(request) == {"traceparent": TRACEPARENT}
    assert proto.trace_carrier(_body_first(None)) == {}


def test_off_the_server_imports_neither_the_trace_sdk_nor_an_exporter() -> None:
    probe = (
        "import sys, extproc.app\n"
        "from extproc.adapters.tracing import tracer_from_env\n"
        "assert tracer_from_env({}) is None\n"
        "print(sorted(m for m in sys.modules if m.startswith(("
        "'opentelemetry.sdk.trace', 'opentelemetry.exporter.otlp'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
