"""A lean HTTP/1.1 load generator: raw asyncio streams, keep-alive, one latency per request.

Run as its own process by ``bench_proxy.py``. It opens ``--connections`` keep-alive
connections, sends ``--warmup`` requests (not measured), prints ``warm`` and waits for a line
on stdin (the caller samples CPU counters then), then sends requests until ``--requests`` are
done or ``--duration`` seconds have passed, and prints one JSON line: the count, errors,
elapsed time and latency percentiles (``time.perf_counter_ns`` around each request, from the
first byte written to the last byte read), and the time to the first body byte (``ttfb_*``:
for a stream, when its first chunk arrived). If the body template contains ``--nonce-marker``,
every request replaces it with a fresh value of the same length (unique prefixes).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from extproc.core import codec

HEADER_END = b"\r\n\r\n"
CONNECT_TIMEOUT_S = 10.0


@dataclass
class Plan:
    """What to send and how much."""

    port: int
    head: bytes
    body: bytes
    marker: bytes
    tag: str
    connections: int
    requests: int
    duration_s: float
    warmup: int
    sent: int = 0

    def next_request(self) -> bytes:
        """The next request's bytes: a fresh nonce when the body has the marker."""
        self.sent += 1
        if not self.marker:
            return self.head + self.body
        width = len(self.marker) - len(self.tag)
        nonce = f"{self.tag}{self.sent:0{width}x}".encode()
        return self.head + self.body.replace(self.marker, nonce, 1)


@dataclass
class Tally:
    """What the measured part saw."""

    latencies_ns: list[int] = field(default_factory=list)
    first_bytes_ns: list[int] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, int]:
    """Read one whole response; return its status and when its first body byte arrived."""
    head = (await reader.readuntil(HEADER_END)).lower()
    status = int(head[9:12])
    first = time.perf_counter_ns()
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        await reader.readexactly(int(head[at + 17 : stop]))
    elif b"transfer-encoding: chunked" in head:
        first = await _read_chunks(reader)
    return status, first


async def _read_chunks(reader: asyncio.StreamReader) -> int:
    """Read a chunked body; when its first chunk had arrived."""
    first = 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are expected
            return first or time.perf_counter_ns()
        await reader.readexactly(size + 2)
        first = first or time.perf_counter_ns()


class Connection:
    """One keep-alive connection that sends one request at a time."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        connect = asyncio.open_connection("127.0.0.1", self._plan.port)
        self._reader, self._writer = await asyncio.wait_for(connect, CONNECT_TIMEOUT_S)

    async def send(self, tally: Tally | None) -> None:
        if self._writer is None:
            await self.open()
        assert self._reader is not None
        assert self._writer is not None
        data = self._plan.next_request()
        started = time.perf_counter_ns()
        try:
            self._writer.write(data)
            status, first_byte = await read_response(self._reader)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self._writer.close()
            self._writer = None
            if tally is not None:
                tally.errors += 1
            return
        if tally is None:
            return
        tally.latencies_ns.append(time.perf_counter_ns() - started)
        tally.first_bytes_ns.append(first_byte - started)
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
        if status != 200:
            tally.errors += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


async def warm_up(plan: Plan, connections: list[Connection]) -> None:
    await asyncio.gather(*(c.open() for c in connections))
    each = max(1, plan.warmup // len(connections))
    for _ in range(each):
        await asyncio.gather(*(c.send(None) for c in connections))


async def measure(plan: Plan, connections: list[Connection]) -> tuple[Tally, float]:
    tally = Tally()
    budget = [plan.requests]
    deadline = time.perf_counter() + plan.duration_s if plan.duration_s else 0.0

    async def worker(connection: Connection) -> None:
        while budget[0] > 0 and (not deadline or time.perf_counter() < deadline):
            budget[0] -= 1
            await connection.send(tally)

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    return tally, time.perf_counter() - started


def percentile(sorted_ns: list[int], q: float) -> float:
    """The ``q`` percentile (nearest rank) in milliseconds; 0 for no samples."""
    if not sorted_ns:
        return 0.0
    rank = min(len(sorted_ns) - 1, max(0, round(q / 100 * len(sorted_ns)) - 1))
    return sorted_ns[rank] / 1e6


def summary(tally: Tally, elapsed_s: float) -> dict[str, object]:
    ordered = sorted(tally.latencies_ns)
    first = sorted(tally.first_bytes_ns)
    done = len(ordered)
    return {
        "requests": done,
        "errors": tally.errors,
        "statuses": {str(k): v for k, v in tally.statuses.items()},
        "elapsed_s": elapsed_s,
        "rps": done / elapsed_s if elapsed_s else 0.0,
        "p50_ms": percentile(ordered, 50),
        "p90_ms": percentile(ordered, 90),
        "p99_ms": percentile(ordered, 99),
        "mean_ms": sum(ordered) / done / 1e6 if done else 0.0,
        "ttfb_p50_ms": percentile(first, 50),
        "ttfb_p90_ms": percentile(first, 90),
    }


async def run(plan: Plan) -> dict[str, object]:
    connections = [Connection(plan) for _ in range(plan.connections)]
    try:
        await warm_up(plan, connections)
        print("warm", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        tally, elapsed = await measure(plan, connections)
    finally:
        for connection in connections:
            connection.close()
    return summary(tally, elapsed)


def _head(args: argparse.Namespace, length: int) -> bytes:
    lines = [
        f"POST {args.path} HTTP/1.1",
        f"host: 127.0.0.1:{args.port}",
        "content-type: application/json",
        f"content-length: {length}",
    ]
    if args.bearer:
        lines.append(f"authorization: Bearer {args.bearer}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def plan_from(args: argparse.Namespace) -> Plan:
    body = Path(args.body).read_bytes()
    marker = args.nonce_marker.encode() if args.nonce_marker.encode() in body else b""
    if marker and len(args.tag) >= len(marker):
        raise SystemExit("loadgen: --tag must be shorter than the nonce marker")
    return Plan(
        port=args.port,
        head=_head(args, len(body)),
        body=body,
        marker=marker,
        tag=args.tag,
        connections=args.connections,
        requests=args.requests,
        duration_s=args.duration,
        warmup=args.warmup,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--body", required=True, help="file with the request body")
    parser.add_argument("--bearer", default="")
    parser.add_argument("--nonce-marker", default="NONCE-NONCE-NONCE-NONCE-")
    parser.add_argument("--tag", default="", help="nonce prefix, unique per run")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; 0: no limit")
    parser.add_argument("--warmup", type=int, default=200)
    result = asyncio.run(run(plan_from(parser.parse_args(argv))))
    sys.stdout.write(codec.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
