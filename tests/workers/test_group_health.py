"""A worker's side of the group: its pipe to the parent, and health that follows the strength."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc.adapters import servicer
from extproc.adapters.telemetry import start_metrics
from extproc.app import HEALTH_SERVICES, App
from extproc.config import Settings
from extproc.workers import Link
from tests.plugins.grpc_server import FakePorts, dependencies

BOUND_S = 10.0


async def statuses(channel: grpc.aio.Channel) -> set[str]:
    """The health of every service the server reports (one value when they agree)."""
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    found = set()
    for name in HEALTH_SERVICES:
        reply = await check(health_pb2.HealthCheckRequest(service=name), timeout=BOUND_S)
        found.add(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return found


@pytest.fixture
async def app(fake_ports: FakePorts) -> AsyncIterator[App]:
    """An app over fake ports, not started yet; stopped at the end."""
    deps = dependencies(fake_ports, InMemoryMetricReader(), servicer.Deadlines(10, 10))

    async def build(_metrics: Any) -> servicer.Dependencies:
        return deps

    settings = Settings(listen="127.0.0.1:0", metrics_listen=None, sweep_interval_s=0)
    app = App(settings, build=build)
    yield app
    await app.stop()


async def test_health_is_serving_only_when_ready_and_at_full_strength(app: App) -> None:
    await app.set_strength(False)  # a new worker joins a group below strength
    await app.start(start_metrics(None, 0)[0])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        assert await statuses(channel) == {"NOT_SERVING"}  # ready, but the group is not
        await app.set_strength(True)
        assert await statuses(channel) == {"SERVING"}
        await app.set_strength(False)
        assert await statuses(channel) == {"NOT_SERVING"}
        await app.set_strength(True)
        assert await statuses(channel) == {"SERVING"}


async def test_a_single_process_is_at_full_strength(app: App) -> None:
    await app.start(start_metrics(None, 0)[0])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        assert await statuses(channel) == {"SERVING"}


async def test_the_link_applies_each_strength_and_ends_when_the_parent_is_gone() -> None:
    parent, child = multiprocessing.Pipe()
    applied: list[bool] = []
    gone = asyncio.Event()

    async def apply(full: bool) -> None:
        applied.append(full)

    link = Link(child)
    follower = await link.join(apply, gone.set)
    assert link.report_ready()
    assert parent.recv_bytes() == b"ready"
    for message in (b"full", b"below", b"full"):
        parent.send_bytes(message)
    parent.close()

    await asyncio.wait_for(gone.wait(), BOUND_S)
    assert follower.done()
    assert applied == [False, True, False, True]  # below strength until the parent says
    assert not link.report_ready()
    child.close()
