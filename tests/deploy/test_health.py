"""``extproc health`` against a real gRPC health service."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.cli import main
from extproc.commands.health import grpc_target, probe

ServingStatus = health_pb2.HealthCheckResponse.ServingStatus


@pytest.mark.parametrize(
    ("address", "target"),
    [
        pytest.param("127.0.0.1:50051", "127.0.0.1:50051", id="loopback"),
        pytest.param("0.0.0.0:50051", "127.0.0.1:50051", id="any-ipv4"),
        pytest.param("[::]:50051", "[::1]:50051", id="any-ipv6"),
        pytest.param("extproc:50051", "extproc:50051", id="hostname"),
        pytest.param("unix:/run/extproc.sock", "unix:///run/extproc.sock", id="uds"),
        pytest.param("unix:relative.sock", "unix:relative.sock", id="uds-relative"),
    ],
)
def test_grpc_target(address: str, target: str) -> None:
    assert grpc_target(address) == target


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


@pytest.mark.parametrize(
    ("status", "shown", "exit_code"),
    [
        pytest.param(ServingStatus.SERVING, "SERVING", 0, id="serving"),
        pytest.param(ServingStatus.NOT_SERVING, "NOT_SERVING", 1, id="not-serving"),
    ],
)
def test_status_and_exit_code(
    health_server: tuple[str, health.HealthServicer],
    capsys: pytest.CaptureFixture[str],
    status: int,
    shown: str,
    exit_code: int,
) -> None:
    address, servicer = health_server
    servicer.set("", status)
    assert main(["health", address]) == exit_code
    assert capsys.readouterr().out.strip() == shown


def test_unknown_service(health_server: tuple[str, health.HealthServicer]) -> None:
    address, _ = health_server
    assert probe(address, "no.such.Service") == "NOT_FOUND"


def test_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert main(["health", f"127.0.0.1:{port}", "--timeout", "0.5"]) == 1
    assert capsys.readouterr().out.strip() == "UNREACHABLE"


def test_address_from_environment(
    health_server: tuple[str, health.HealthServicer], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, servicer = health_server
    servicer.set("", ServingStatus.SERVING)
    monkeypatch.setenv("EXTPROC_LISTEN", address)
    assert main(["health"]) == 0
