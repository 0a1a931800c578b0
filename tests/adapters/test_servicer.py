"""The real grpc.aio server answering Envoy's side of ``Process``: replies, joins and commits."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2

from extproc._envoy_api.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.adapters import servicer
from extproc.app import App
from extproc.config import Settings
from extproc.core import codec
from extproc.core.model import Tier
from tests.plugins.grpc_server import (
    MODEL,
    EnvoySide,
    FakePorts,
    ServerHarness,
    bearer,
    dependencies,
)

Mode = processing_mode_pb2.ProcessingMode
SYSTEM = "you are a careful assistant who answers briefly"  # 8 words = 8 fake tokens
MARKED = codec.dumps(
    {
        "model": MODEL,
        "messages": [
            {
                "role": "system",
                "content": [
                    {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}
                ],
            },
            {"role": "user", "content": "hi"},
        ],
    }
)
USAGE = {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}
JSON_ANSWER = codec.dumps({"id": "c1", "choices": [], "usage": USAGE})
CONTENT = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
USAGE_FRAME = b"data: " + codec.dumps({"choices": [], "usage": USAGE}) + b"\n\n"
DONE = b"data: [DONE]\n\n"


def mode(header: Any, body: Any) -> processing_mode_pb2.ProcessingMode:
    return Mode(
        request_body_mode=Mode.NONE,
        response_header_mode=header,
        response_body_mode=body,
        request_trailer_mode=Mode.SKIP,
        response_trailer_mode=Mode.SKIP,
    )


def kind(reply: pb.ProcessingResponse) -> str | None:
    return reply.WhichOneof("response")


def common(reply: pb.ProcessingResponse) -> pb.CommonResponse:
    name = kind(reply)
    assert name is not None
    part = getattr(reply, name)
    assert isinstance(part.response, pb.CommonResponse)
    return part.response


def set_headers(reply: pb.ProcessingResponse) -> dict[str, bytes]:
    return {h.header.key: h.header.raw_value for h in common(reply).header_mutation.set_headers}


def is_plain_continue(reply: pb.ProcessingResponse) -> bool:
    return not reply.HasField("mode_override") and common(reply) == pb.CommonResponse()


async def wait(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), 10)


async def open_chat(stream: EnvoySide) -> None:
    await stream.request_headers(**bearer())
    await stream.request_body(MARKED)


# ---- replies, in order, with their oneofs ----


async def test_json_request_gets_four_replies_and_commits_after_eos(
    extproc_server: ServerHarness,
) -> None:
    stream = extproc_server.stream()
    replies = [await stream.request_headers(**bearer())]
    replies.append(await stream.request_body(MARKED))
    replies.append(await stream.response_headers(200, "application/json"))
    extproc_server.ports.index.commit_gate.clear()
    replies.append(await stream.response_body(JSON_ANSWER, eos=True))
    await stream.finish()

    assert [kind(r) for r in replies] == [
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
    ]
    assert is_plain_continue(replies[0])
    forwarded = common(replies[1]).body_mutation.body
    assert b"cache_control" not in forwarded
    assert set_headers(replies[1]) == {"content-length": str(len(forwarded)).encode()}
    assert replies[2].mode_override == mode(Mode.SEND, Mode.BUFFERED)
    answer = common(replies[3]).body_mutation.body
    usage = codec.loads(answer)["usage"]
    assert usage["cache_creation"][Tier.M5.usage_key] == 8
    assert usage["prompt_tokens"] == 20
    assert set_headers(replies[3]) == {"content-length": str(len(answer)).encode()}

    await wait(extproc_server.ports.index.commit_started)  # scheduled after the eos reply
    assert extproc_server.commits.pending == 1
    assert extproc_server.ports.index.inner.commits == []
    extproc_server.ports.index.commit_gate.set()
    assert await extproc_server.commits.drain(10) == 0
    [pending] = extproc_server.ports.index.inner.commits
    assert [e.cumulative_token_count for e in pending.entries] == [8]
    assert extproc_server.counter("extproc.commit_results") == {(("result", "ok"),): 1}
    assert extproc_server.counter("extproc.requests") == {(("markers", "true"),): 1}
    assert extproc_server.counter("extproc.outcomes") == {
        (("model", MODEL), ("outcome", "create_only")): 1
    }
    assert extproc_server.counter("extproc.tokens") == {
        (("kind", "creation"), ("model", MODEL), ("tier", "5m")): 8
    }


async def test_unknown_model_is_never_a_metric_label(extproc_server: ServerHarness) -> None:
    stream = extproc_server.stream()
    await stream.request_headers(**bearer())
    await stream.request_body(MARKED.replace(b'"model":"m"', b'"model":"client-typed-anything"'))
    watched = await stream.response_headers(200, "application/json")  # to scrub provider fields
    assert watched.mode_override == mode(Mode.SEND, Mode.BUFFERED)
    assert is_plain_continue(await stream.response_body(JSON_ANSWER, eos=True))
    await stream.finish()
    assert extproc_server.counter("extproc.outcomes") == {(("outcome", "inactive"),): 1}
    assert extproc_server.counter("extproc.commit_vetoes") == {}


async def test_non_chat_request_skips_everything_else(extproc_server: ServerHarness) -> None:
    stream = extproc_server.stream()
    reply = await stream.request_headers("/v1/models", "GET", **bearer())
    assert kind(reply) == "request_headers"
    assert reply.mode_override == mode(Mode.SKIP, Mode.NONE)
    await stream.finish()


async def test_bad_marker_gets_an_immediate_400(extproc_server: ServerHarness) -> None:
    stream = extproc_server.stream()
    await stream.request_headers(**bearer())
    bad = MARKED.replace(b'"ephemeral"', b'"forever"')
    reply = await stream.request_body(bad)
    await stream.finish()
    assert kind(reply) == "immediate_response"
    answer = reply.immediate_response
    assert answer.status.code == 400
    assert [(h.header.key, h.header.raw_value) for h in answer.headers.set_headers] == [
        ("content-type", b"application/json")
    ]
    assert codec.loads(answer.body)["error"]["code"] == "invalid_cache_control"
    assert answer.details == "extproc_invalid_cache_control"
    assert extproc_server.counter("extproc.marker_rejections") == {
        (("reason", "unsupported_type"),): 1
    }


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([pb.ProcessingRequest()], id="no-message"),
        pytest.param(
            [pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x", end_of_stream=True))],
            id="body-before-headers",
        ),
    ],
)
async def test_protocol_errors_fail_the_stream(
    extproc_server: ServerHarness, messages: list[pb.ProcessingRequest]
) -> None:
    stream = extproc_server.stream()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await _send_all(stream, messages)
    assert failed.value.code() is grpc.StatusCode.INTERNAL


async def _send_all(stream: EnvoySide, messages: list[pb.ProcessingRequest]) -> None:
    for message in messages:
        await stream.send(message)


# ---- SSE: the join happens at the usage frame only ----


async def test_slow_classify_does_not_hold_the_first_sse_chunk(
    extproc_server: ServerHarness,
) -> None:
    index = extproc_server.ports.index
    index.lookup_gate.clear()
    stream = extproc_server.stream()
    await open_chat(stream)
    await wait(index.lookup_started)
    headers = await stream.response_headers(200, "text/event-stream")
    assert headers.mode_override == mode(Mode.SEND, Mode.STREAMED)
    assert list(common(headers).header_mutation.remove_headers) == ["content-length"]
    first = await stream.response_body(CONTENT)
    assert kind(first) == "response_body"
    assert is_plain_continue(first)
    assert not index.lookup_gate.is_set()  # answered while classify was still blocked

    index.lookup_gate.set()
    edited = common(await stream.response_body(USAGE_FRAME)).body_mutation.body
    usage = codec.loads(edited.removeprefix(b"data: "))["usage"]
    assert usage["cache_creation_input_tokens"] == 8
    assert is_plain_continue(await stream.response_body(DONE))
    assert is_plain_continue(await stream.response_body(b"", eos=True))
    await stream.finish()
    await extproc_server.commits.drain(10)
    assert len(index.inner.commits) == 1


async def test_tokens_sharing_a_chunk_with_the_usage_frame_are_not_held(
    extproc_server: ServerHarness,
) -> None:
    index = extproc_server.ports.index
    index.lookup_gate.clear()
    stream = extproc_server.stream()
    await open_chat(stream)
    await stream.response_headers(200, "text/event-stream")
    first = await stream.response_body(CONTENT + USAGE_FRAME)
    assert common(first).body_mutation.body == CONTENT  # out while classify is blocked
    assert not index.lookup_gate.is_set()
    index.lookup_gate.set()
    last = common(await stream.response_body(DONE, eos=True)).body_mutation.body
    assert last.endswith(DONE)
    assert b'"cache_creation_input_tokens":8' in last
    await stream.finish()
    await extproc_server.commits.drain(10)
    assert len(index.inner.commits) == 1


@pytest.mark.parametrize(
    "deadlines", [pytest.param(servicer.Deadlines(classify_s=0.05, commit_s=10), id="50ms")]
)
async def test_deadline_exceeded_leaves_usage_untouched_and_commits_nothing(
    extproc_server: ServerHarness,
) -> None:
    index = extproc_server.ports.index
    index.lookup_gate.clear()
    stream = extproc_server.stream()
    await open_chat(stream)
    await stream.response_headers(200, "text/event-stream")
    assert is_plain_continue(await stream.response_body(CONTENT))
    assert is_plain_continue(await stream.response_body(USAGE_FRAME))
    await wait(index.lookup_cancelled)
    assert is_plain_continue(await stream.response_body(b"", eos=True))
    await stream.finish()
    await extproc_server.commits.drain(10)
    assert index.inner.commits == []
    assert extproc_server.counter("extproc.classify_results") == {
        (("result", "deadline_exceeded"),): 1
    }


EXTENDING = servicer.Deadlines(classify_s=3.0, commit_s=10, reply_budget_s=0.1, margin_s=0.5)


@pytest.mark.parametrize("deadlines", [pytest.param(EXTENDING, id="budget-100ms")])
async def test_a_long_join_first_extends_envoys_timer(extproc_server: ServerHarness) -> None:
    index = extproc_server.ports.index
    index.lookup_gate.clear()
    stream = extproc_server.stream()
    await open_chat(stream)
    await stream.response_headers(200, "application/json")
    extension = await stream.response_body(JSON_ANSWER, eos=True)
    assert kind(extension) is None  # only the timer, no reply yet
    timeout = extension.override_message_timeout
    assert 3.2 < timeout.seconds + timeout.nanos / 1e9 <= 3.4  # the rest of 3 s, plus 0.5
    index.lookup_gate.set()
    reply = await stream.read()
    usage = codec.loads(common(reply).body_mutation.body)["usage"]
    assert usage["cache_creation_input_tokens"] == 8
    await stream.finish()


@pytest.mark.parametrize("deadlines", [pytest.param(EXTENDING, id="budget-100ms")])
async def test_a_quick_join_sends_no_extension(extproc_server: ServerHarness) -> None:
    stream = extproc_server.stream()
    await open_chat(stream)
    await stream.response_headers(200, "application/json")
    reply = await stream.response_body(JSON_ANSWER, eos=True)
    assert kind(reply) == "response_body"
    assert not reply.HasField("override_message_timeout")
    await stream.finish()


SHORT_EXTENDED = servicer.Deadlines(classify_s=0.3, commit_s=10, reply_budget_s=0.1, margin_s=0.5)


@pytest.mark.parametrize("deadlines", [pytest.param(SHORT_EXTENDED, id="300ms")])
async def test_an_extended_join_still_ends_at_the_deadline(extproc_server: ServerHarness) -> None:
    extproc_server.ports.index.lookup_gate.clear()
    stream = extproc_server.stream()
    await open_chat(stream)
    await stream.response_headers(200, "application/json")
    assert kind(await stream.response_body(JSON_ANSWER, eos=True)) is None
    assert is_plain_continue(await stream.read())  # inactive: usage untouched
    await stream.finish()
    assert extproc_server.counter("extproc.classify_results") == {
        (("result", "deadline_exceeded"),): 1
    }


async def test_breakpoint_param_is_removed_from_the_path(extproc_server: ServerHarness) -> None:
    stream = extproc_server.stream()
    reply = await stream.request_headers(
        "/v1/chat/completions?x=1&cacheBreakpoint=lastUserMessage", **bearer()
    )
    assert set_headers(reply) == {":path": b"/v1/chat/completions?x=1"}
    await stream.request_body(
        codec.dumps({"model": MODEL, "messages": [{"role": "user", "content": SYSTEM}]})
    )
    await stream.response_headers(200, "application/json")
    edited = await stream.response_body(JSON_ANSWER, eos=True)
    assert codec.loads(common(edited).body_mutation.body)["usage"]["cache_creation"] == {
        "ephemeral_5m_input_tokens": 0,
        "ephemeral_1h_input_tokens": 8,
        "ephemeral_24h_input_tokens": 0,
    }
    await stream.finish()


async def test_bad_breakpoint_param_is_refused_before_the_body(
    extproc_server: ServerHarness,
) -> None:
    stream = extproc_server.stream()
    reply = await stream.request_headers("/v1/chat/completions?cacheBreakpoint=", **bearer())
    await stream.finish()
    assert kind(reply) == "immediate_response"
    assert reply.immediate_response.status.code == 400
    assert codec.loads(reply.immediate_response.body)["error"]["param"] == "cacheBreakpoint"
    assert extproc_server.counter("extproc.marker_rejections") == {
        (("reason", "invalid_cache_breakpoint"),): 1
    }


async def test_stream_cancelled_before_eos_commits_nothing(extproc_server: ServerHarness) -> None:
    stream = extproc_server.stream()
    await open_chat(stream)
    await stream.response_headers(200, "text/event-stream")
    edited = await stream.response_body(USAGE_FRAME)
    assert common(edited).body_mutation.body != USAGE_FRAME  # classified and shown...
    stream.cancel()
    vetoes = await _eventually(lambda: extproc_server.counter("extproc.commit_vetoes"))
    assert vetoes == {(("reason", "no_end_of_stream"),): 1}
    await extproc_server.commits.drain(10)
    assert extproc_server.ports.index.inner.commits == []  # ...but never committed


async def test_stream_ending_early_cancels_classify(extproc_server: ServerHarness) -> None:
    index = extproc_server.ports.index
    index.lookup_gate.clear()
    stream = extproc_server.stream()
    await open_chat(stream)
    await wait(index.lookup_started)
    await stream.finish()  # EOF without a response: Envoy gave up on the request
    await wait(index.lookup_cancelled)
    assert index.inner.commits == []


async def _eventually(read: Any, timeout_s: float = 10.0) -> Any:
    """``read()`` once truthy, else its last value after ``timeout_s`` (a bound, not a check)."""
    for _ in range(int(timeout_s / 0.02)):
        value = read()
        if value:
            return value
        await asyncio.sleep(0.02)
    return read()


# ---- health and graceful shutdown of the whole app ----


def app_settings(database_url: str = "postgresql://unused@127.0.0.1:1/x") -> Settings:
    return Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        metrics_listen=None,
        shutdown_grace_s=10,
        sweep_interval_s=0,
    )


async def health_of(channel: grpc.aio.Channel, service: str) -> str:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    request = health_pb2.HealthCheckRequest(service=service)
    response = await check(request, wait_for_ready=True, timeout=10)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


async def _started(app: App) -> grpc.aio.Channel:
    port = await _eventually(lambda: app.port)
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def test_health_follows_readiness_and_shutdown_waits_for_commits(
    fake_ports: FakePorts,
) -> None:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    ready = asyncio.Event()
    deps = dependencies(fake_ports, InMemoryMetricReader(), servicer.Deadlines(10, 10))

    async def build(_metrics: Any) -> servicer.Dependencies:
        await ready.wait()  # stands in for the database pool opening
        return deps

    app = App(app_settings(), build=build)
    starting = asyncio.create_task(app.start(deps.metrics))
    channel = await _started(app)
    try:
        assert await health_of(channel, "") == "NOT_SERVING"
        early = EnvoySide(_stub(channel).Process())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await early.request_headers(**bearer())
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

        ready.set()
        await starting
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            assert await health_of(channel, service) == "SERVING"

        fake_ports.index.commit_gate.clear()
        stream = EnvoySide(_stub(channel).Process())
        await open_chat(stream)
        await stream.response_headers(200, "application/json")
        await stream.response_body(JSON_ANSWER, eos=True)
        await stream.finish()
        await wait(fake_ports.index.commit_started)

        stopping = asyncio.create_task(app.stop())
        await asyncio.sleep(0.2)
        assert not stopping.done()  # holding on for the pending commit
        fake_ports.index.commit_gate.set()
        await stopping
        assert len(fake_ports.index.inner.commits) == 1
    finally:
        await channel.close()
        if not starting.done():
            starting.cancel()
        await app.stop()


def _stub(channel: grpc.aio.Channel) -> Any:
    from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    return pb_grpc.ExternalProcessorStub(channel)


async def test_app_serves_with_the_real_database(database_url: str) -> None:
    from extproc.adapters.telemetry import start_metrics

    metrics, server = start_metrics(None, 0)
    app = App(app_settings(database_url))
    try:
        await asyncio.wait_for(app.start(metrics), 30)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        assert await health_of(channel, "") == "SERVING"
        stream = EnvoySide(_stub(channel).Process())
        await open_chat(stream)  # a key the database does not know: inactive
        await stream.response_headers(200, "application/json")
        assert is_plain_continue(await stream.response_body(JSON_ANSWER, eos=True))
        await stream.finish()
        await channel.close()
    finally:
        await app.stop()
        server.close()


# ---- the `extproc serve` process ----


@pytest.mark.parametrize("workers", [pytest.param(1, id="one"), pytest.param(2, id="two-workers")])
async def test_serve_process_becomes_ready_and_stops_on_sigterm(
    database_url: str, tmp_path: Any, workers: int
) -> None:
    import os
    import signal
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
    env |= {
        "EXTPROC_LISTEN": f"127.0.0.1:{port}",
        "EXTPROC_DATABASE_URL": database_url,
        "EXTPROC_METRICS_LISTEN": "off",
        "EXTPROC_WORKERS": str(workers),
        "EXTPROC_SHUTDOWN_GRACE_S": "5",
    }
    log = (tmp_path / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extproc.cli", "serve", env=env, stdout=log, stderr=log
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # With several workers, health says NOT_SERVING until the whole group serves.
            assert await _until_serving(channel) == "SERVING"
        serving = await _eventually(
            lambda: _count(tmp_path / "serve.log", "serving") == workers, timeout_s=30
        )
        assert serving, "every worker reports serving"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
    assert _count(tmp_path / "serve.log", "stopped") == workers


async def _until_serving(channel: grpc.aio.Channel, timeout_s: float = 30.0) -> str:
    """The health status once it is SERVING, or the last one seen after ``timeout_s``."""
    status = ""
    for _ in range(int(timeout_s / 0.1)):
        status = await health_of(channel, "")
        if status == "SERVING":
            return status
        await asyncio.sleep(0.1)
    return status


def _count(path: Any, message: str) -> int:
    return sum(f'"msg":"{message}"' in line for line in path.read_text().splitlines())


async def test_a_taken_port_is_a_clear_error() -> None:
    import socket

    from extproc.adapters.telemetry import start_metrics
    from extproc.app import ListenError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = App(Settings(listen=f"127.0.0.1:{port}", database_url="postgresql://x"))
        metrics, server = start_metrics(None, 0)
        try:
            with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}"):
                await app.start(metrics)
        finally:
            await app.stop()
            server.close()


# ---- the accounting record, as dynamic metadata ----


def _record(reply: pb.ProcessingResponse) -> dict[str, Any] | None:
    fields = reply.dynamic_metadata.fields
    if "extproc.prompt_cache" not in fields:
        return None
    return dict(MessageToDict(fields["extproc.prompt_cache"].struct_value))


async def test_a_streams_usage_frame_carries_a_record_its_end_completes(
    extproc_server: ServerHarness,
) -> None:
    stream = extproc_server.stream()
    await open_chat(stream)
    headers = await stream.response_headers(200, "text/event-stream")
    content = await stream.response_body(CONTENT)
    usage = await stream.response_body(USAGE_FRAME)
    end = await stream.response_body(DONE, eos=True)
    await stream.finish()

    assert _record(headers) is None
    assert _record(content) is None
    so_far, final = _record(usage), _record(end)
    assert so_far is not None
    assert final is not None
    assert (so_far["outcome"], so_far["commit"]) == ("create_only", "no_end_of_stream")
    assert (final["outcome"], final["commit"]) == ("create_only", "scheduled")
    assert so_far["creation_5m"] == final["creation_5m"] == 8
    assert final["principal"] == "tenant-1"
    assert extproc_server.counter("extproc.read_tokens") == {}  # a write: no read counted


async def test_a_json_answer_gets_its_record_with_the_last_reply(
    extproc_server: ServerHarness,
) -> None:
    stream = extproc_server.stream()
    await open_chat(stream)
    headers = await stream.response_headers(200, "application/json")
    end = await stream.response_body(JSON_ANSWER, eos=True)
    await stream.finish()

    assert _record(headers) is None
    assert _record(end) == {
        "outcome": "create_only",
        "reason": "",
        "model": MODEL,
        "principal": "tenant-1",
        "route": "chat_completions",
        "prompt_tokens": 20.0,
        "read": 0.0,
        "creation_5m": 8.0,
        "creation_1h": 0.0,
        "creation_24h": 0.0,
        "read_source": "index",
        "commit": "scheduled",
    }
