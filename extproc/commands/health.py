"""``extproc health``: ask a server's gRPC health service whether it is serving; exit 0 or 1."""

from __future__ import annotations

import argparse
import os

import grpc
from grpc_health.v1 import health_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
CHECK_METHOD = "/grpc.health.v1.Health/Check"
EXIT_NOT_SERVING = 1
# A server bound to every interface is probed on the loopback address of the same family.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "health",
        help="check the gRPC health service of a running server (exit 0 when SERVING)",
        description="Call grpc.health.v1.Health/Check on ADDRESS and print the status. "
        "Exit 0 when it is SERVING, 1 otherwise (not serving, unreachable, timed out). "
        "Used by container health checks.",
    )
    parser.add_argument(
        "address",
        nargs="?",
        default=None,
        help="host:port or unix:/path (default: $EXTPROC_LISTEN, else 127.0.0.1:50051)",
    )
    parser.add_argument("--service", default="", help="service name to check (default: overall)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    address = args.address or os.environ.get("EXTPROC_LISTEN") or DEFAULT_ADDRESS
    status = probe(address, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else EXIT_NOT_SERVING


def grpc_target(address: str) -> str:
    """The gRPC channel target that reaches a server listening on ``address``."""
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        return "unix://" + path if path.startswith("/") else "unix:" + path
    host, _, port = address.rpartition(":")
    return f"{_WILDCARDS.get(host, host)}:{port}"


def probe(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The health status name of ``service`` at ``address``, or ``UNREACHABLE``."""
    with grpc.insecure_channel(grpc_target(address)) as channel:
        check = channel.unary_unary(
            CHECK_METHOD,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            reply = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = getattr(exc, "code", lambda: None)()
            return "NOT_FOUND" if code is grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
