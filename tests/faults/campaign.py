"""The fault campaign: randomised traffic through the real stack while dependencies fail.

``Campaign.run`` sends the planned requests (``tests.faults.model``) through Envoy and the real
``extproc serve`` with a pool of concurrent clients, while a scheduler injects faults:

* in part A, the server is SIGKILLed while streams are in flight and restarted (twice);
* in part B, one dependency fault at a time, each followed by a recovery pause: PostgreSQL down,
  slow, flapping and black-holed (the TCP proxy in front of it stopped, delayed, toggled,
  stalled), the tokenizer service down (its proxy stopped), slow (the fake's delay) and
  miscounting;
* throughout, single requests get an upstream reset at a random byte offset, a 5xx, a
  mid-stream error frame, or a client that hangs up at a random point.

Then it checks every invariant against the fault-free model and returns the ``Report``: usage
values, index rows, forwarded bytes, hung streams, and the server's tasks, descriptors and
connections (compared with a baseline taken between the parts), PostgreSQL's sessions included.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import psutil
import psycopg

from extproc.core import codec
from tests.e2e.chat import CHAT, event_json, headers, split_events, usage_events
from tests.fakes.upstream import Answer, Record
from tests.faults.model import (
    PROMPT_TOKENS,
    ZERO,
    Fault,
    Model,
    Observed,
    Outcome,
    Planned,
    Result,
    Value,
    observed,
    plan,
    shape,
)
from tests.plugins.stack import Stack

T = TypeVar("T")

# A request that has not ended by then hangs: the longest planned answer takes about 1.5 s,
# a classification at most the stack's 1.5 s deadline, a slow database adds a few seconds.
HANG_S = 20.0
WARM_REQUESTS = 300  # after the restarts, before the baseline
BREAKER_COOLDOWN_S = 2.0  # the server's default (EXTPROC_BREAKER_COOLDOWN_S)
# A dependency fault may still show this long after it ends (the breaker's cooldown, retries).
RECOVERY_S = BREAKER_COOLDOWN_S + 2.0
COMMIT_DEADLINE_S = 2.0  # the server's default (EXTPROC_COMMIT_DEADLINE_MS)
POOL_MAX = 10  # the server's PostgreSQL pool (extproc.adapters.postgres.open_pool)
ENVOY_CONNECTIONS = 4  # Envoy runs one worker thread: one gRPC connection, a few while draining
TASK_SLACK = 2  # idle-state tasks that may legitimately differ (pool maintenance)
FD_SLACK = 2


@dataclass
class Window:
    """A fault active from ``start`` to ``end`` (monotonic seconds)."""

    kind: str
    start: float
    end: float = math.inf


@dataclass(frozen=True, slots=True)
class Resources:
    """What the server process holds when idle."""

    tasks: int
    fds: int
    sockets: int
    accounted_sockets: int  # sockets psutil can name (TCP, Unix)
    peers: dict[str, int]
    close_wait: int
    pg_sessions: int
    pg_busy: int

    def line(self) -> str:
        peers = ", ".join(f"{k} {v}" for k, v in sorted(self.peers.items()))
        return (
            f"tasks {self.tasks}, fds {self.fds} ({self.sockets} sockets: {peers}), "
            f"close_wait {self.close_wait}, pg sessions {self.pg_sessions} "
            f"({self.pg_busy} busy)"
        )


@dataclass
class Report:
    seed: int
    requests: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    values: collections.Counter[str] = field(default_factory=collections.Counter)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0
    duration_s: float = 0.0
    baseline: Resources | None = None
    final: Resources | None = None

    def violate(self, kind: str, detail: str) -> None:
        self.violations.append((kind, detail))

    def lines(self) -> list[str]:
        kinds = collections.Counter(kind for kind, _ in self.violations)
        out = [
            f"fault campaign: seed {self.seed} (replay: EXTPROC_CAMPAIGN_SEED={self.seed})",
            f"  requests {self.requests} in {self.duration_s:.1f} s; outcomes: "
            + _counts(self.outcomes),
            "  usage values: " + _counts(self.values),
            "  faults: " + _counts(self.faults),
            f"  index rows {self.rows}",
            f"  server before part B: {self.baseline.line() if self.baseline else '-'}",
            f"  server at the end:    {self.final.line() if self.final else '-'}",
            f"  violations = {len(self.violations)}" + (f": {_counts(kinds)}" if kinds else ""),
        ]
        out += [f"    {kind}: {detail}" for kind, detail in self.violations[:25]]
        return out


def _counts(counter: collections.Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "-"


class Campaign:
    """One run against ``stack`` (built with ``StackSettings(proxied=True)``)."""

    def __init__(
        self,
        stack: Stack,
        seed: int,
        metrics_url: str,
        *,
        part_a: int = 500,
        part_b: int = 2500,
        tenants: int = 4,
        concurrency: int = 12,
        time_limit_s: float = 75.0,
    ) -> None:
        self.stack = stack
        self.seed = seed
        self.metrics_url = metrics_url
        self.rng = random.Random(seed)
        self.tenants = tenants
        self.concurrency = concurrency
        self.time_limit_s = time_limit_s
        self.keys = {t: f"sk-campaign-{seed}-{t}" for t in range(tenants)}
        self.principals = {t: stack.principal_of(k) for t, k in self.keys.items()}
        self.part_a = plan(self.rng, 0, part_a, tenants, slow_share=0.5)
        self.warm = plan(self.rng, part_a, WARM_REQUESTS, tenants, slow_share=0.15)
        self.part_b = plan(self.rng, part_a + WARM_REQUESTS, part_b, tenants, slow_share=0.15)
        self.windows: list[Window] = []
        self.results: list[Result] = []
        self.report = Report(seed)
        self._streaming = 0  # streams that have received bytes and not ended
        self._progress = 0.0  # the share of the current part's requests started
        self._moved = asyncio.Event()  # set whenever a request or a stream starts
        self._counts: dict[str, int] = {}
        self._deadline = 0.0

    # ---- running ----

    async def run(self) -> Report:
        began = time.monotonic()
        self._deadline = began + self.time_limit_s
        self._shapes(self.part_a + self.warm + self.part_b)
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        async with httpx.AsyncClient(
            base_url=self.stack.url, timeout=httpx.Timeout(HANG_S), limits=limits
        ) as client:
            await self._part(client, self.part_a, self._kills)
            await self._part(client, self.warm, _no_faults)  # the restarted server warms up
            await self._quiesce()
            self.report.baseline = await self._resources()
            await self._part(client, self.part_b, self._dependency_faults)
        await self._quiesce()
        self.report.final = await self._resources()
        self.report.duration_s = time.monotonic() - began
        self._check()
        return self.report

    def _shapes(self, planned: Sequence[Planned]) -> None:
        assert self.stack.tokenizer is not None
        tokenizer = self.stack.tokenizer

        def counts(texts: list[str]) -> list[int]:
            missing = [t for t in texts if t not in self._counts]
            if missing:
                self._counts.update(zip(missing, tokenizer.count("demo", missing), strict=True))
            return [self._counts[t] for t in texts]

        self._shape = {p.index: shape(p, self.seed, counts) for p in planned}

    async def _part(
        self,
        client: httpx.AsyncClient,
        planned: Sequence[Planned],
        faults: Callable[[asyncio.Event], Awaitable[None]],
    ) -> None:
        queue = collections.deque(planned)
        done = asyncio.Event()
        self._progress = 0.0

        async def worker() -> None:
            while queue and time.monotonic() < self._deadline:
                self._progress = 1 - len(queue) / len(planned)
                self._moved.set()
                self.results.append(await self._one(client, queue.popleft()))

        injector = asyncio.create_task(faults(done))
        try:
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        finally:
            done.set()
            await injector

    async def _one(self, client: httpx.AsyncClient, p: Planned) -> Result:
        result = Result(p, self._shape[p.index], start=time.monotonic())
        answer = Answer(
            tag=p.tag,
            status=500 if p.fault is Fault.UPSTREAM_5XX else 200,
            prompt_tokens=PROMPT_TOKENS,
            split=p.split,
            crlf=p.crlf,
            error_frame=p.fault is Fault.ERROR_FRAME,
            reset_after=p.reset_after,
            chunk_delay_ms=p.chunk_delay_ms,
        )
        key = None if p.tenant is None else self.keys[p.tenant]
        sent = headers(key, answer)
        try:
            async with asyncio.timeout(HANG_S):
                if p.stream:
                    await self._stream(client, result, sent)
                else:
                    await self._json(client, result, sent)
        except TimeoutError:
            result.error = "hung"
        except httpx.HTTPError as exc:
            result.error = type(exc).__name__
        result.end = time.monotonic()
        return result

    async def _json(self, client: httpx.AsyncClient, result: Result, sent: dict[str, str]) -> None:
        p = result.planned
        if p.fault is Fault.CLIENT_DISCONNECT:
            status, body = await self._hang_up(result.shape.raw, sent, p.disconnect_after / 1000)
            if status is None:
                result.error = "disconnected"
                return
        else:
            response = await client.post(CHAT, content=result.shape.raw, headers=sent)
            status, body = response.status_code, response.content
        result.status, result.body = status, body
        try:
            doc = codec.loads(result.body)
        except codec.JSONDecodeError:
            return
        if isinstance(doc, dict) and "usage" in doc:
            result.usages.append(observed(doc["usage"]))
            result.complete = result.status == 200 and "error" not in doc

    async def _hang_up(
        self, body: bytes, sent: dict[str, str], after_s: float
    ) -> tuple[int | None, bytes]:
        """POST on a connection of its own that the client closes after ``after_s``.

        Returns the status and body when the whole answer came first, else ``(None, b"")``.
        (A socket of its own, so that the hang-up is a plain close and nothing is left open.)
        """
        host, _, port = self.stack.url.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = [f"POST {CHAT} HTTP/1.1", f"host: {host}:{port}", "connection: close"]
        head += [f"{k}: {v}" for k, v in sent.items()] + [f"content-length: {len(body)}"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        try:
            async with asyncio.timeout(after_s):
                answer = await reader.read()  # until the server closes (connection: close)
        except TimeoutError:
            return None, b""
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        status_line, _, rest = answer.partition(b"\r\n")
        fields, _, payload = rest.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in fields.lower():
            payload = _dechunk(payload)
        try:
            return int(status_line.split()[1]), payload
        except (IndexError, ValueError):
            return None, b""

    async def _stream(
        self, client: httpx.AsyncClient, result: Result, sent: dict[str, str]
    ) -> None:
        p = result.planned
        chunks: list[bytes] = []
        counted = False
        try:
            async with client.stream("POST", CHAT, content=result.shape.raw, headers=sent) as r:
                result.status = r.status_code
                async for chunk in r.aiter_raw():
                    chunks.append(chunk)
                    if not counted:
                        counted, self._streaming = True, self._streaming + 1
                        self._moved.set()
                    if p.fault is Fault.CLIENT_DISCONNECT and len(chunks) >= p.disconnect_after:
                        result.error = "disconnected"
                        break
        finally:
            if counted:
                self._streaming -= 1
            result.body = b"".join(chunks)
            events = split_events(result.body)
            result.usages = [observed(u) for _, u in usage_events(events)]
            errors = [e for e in events if _is_error_event(e)]
            result.complete = (
                result.error is None
                and result.status == 200
                and bool(events)
                and event_json(events[-1]) is None
                and b"[DONE]" in events[-1]
                and len(result.usages) == 1
                and not errors
            )

    # ---- faults ----

    async def _kills(self, done: asyncio.Event) -> None:
        """SIGKILL the server while streams are in flight, restart it: at 20% and 60% of part A."""
        for at in (0.2, 0.6):
            while self._progress < at and not done.is_set():
                self._moved.clear()
                await self._moved.wait()
            self._moved.clear()
            with contextlib.suppress(TimeoutError):  # then kill between streams: also a fault
                await asyncio.wait_for(self._in_flight(), 3.0)
            await self._kill_and_restart()

    async def _in_flight(self) -> None:
        while not self._streaming:
            self._moved.clear()
            await self._moved.wait()

    async def _kill_and_restart(self) -> None:
        extproc = self.stack.extproc
        assert extproc is not None
        window = Window("sidecar_kill", time.monotonic())
        self.windows.append(window)
        self.report.faults["sidecar_kill"] += 1
        self.report.faults["streams_in_flight_at_kill"] += self._streaming
        extproc.signal(signal.SIGKILL)
        await asyncio.to_thread(extproc.wait, 10)
        await asyncio.to_thread(self.stack.start_extproc)
        window.end = time.monotonic()

    async def _dependency_faults(self, done: asyncio.Event) -> None:
        """One dependency fault at a time, in a seeded order, each followed by recovery."""
        kinds: list[Callable[[asyncio.Event], Awaitable[None]]] = [
            self._db_down,
            self._db_slow,
            self._db_flapping,
            self._db_black_hole,
            self._tokenizer_down,
            self._tokenizer_slow,
            self._tokenizer_wrong_counts,
        ]
        order = self.rng.sample(kinds, len(kinds))
        while not done.is_set():
            for inject in order:
                if await _wait(done, 0.5):
                    return
                await inject(done)
                if await _wait(done, BREAKER_COOLDOWN_S + 0.5):
                    return

    async def _fault(
        self,
        kind: str,
        done: asyncio.Event,
        begin: Callable[[], Awaitable[None]],
        end: Callable[[], Awaitable[None]],
        length_s: float,
    ) -> None:
        window = Window(kind, time.monotonic())
        self.windows.append(window)
        self.report.faults[kind] += 1
        await begin()
        try:
            await _wait(done, length_s)
        finally:
            await end()
            window.end = time.monotonic()

    def _on_loop(self, coro: Awaitable[T]) -> Awaitable[T]:
        assert self.stack.loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self.stack.loop.loop)  # type: ignore[arg-type]
        return asyncio.wrap_future(future)

    async def _db_down(self, done: asyncio.Event) -> None:
        proxy = self.stack.database_proxy
        assert proxy is not None
        length = self.rng.uniform(1.0, 2.0)
        await self._fault(
            "database_down",
            done,
            lambda: self._on_loop(proxy.stop()),
            lambda: self._on_loop(proxy.start()),
            length,
        )

    async def _db_slow(self, done: asyncio.Event) -> None:
        proxy = self.stack.database_proxy
        assert proxy is not None
        delay = self.rng.uniform(0.05, 0.8)

        async def begin() -> None:
            proxy.delay = delay

        async def end() -> None:
            proxy.delay = 0.0

        await self._fault("database_slow", done, begin, end, self.rng.uniform(1.0, 2.0))

    async def _db_flapping(self, done: asyncio.Event) -> None:
        proxy = self.stack.database_proxy
        assert proxy is not None
        stop = asyncio.Event()
        flaps = self.rng

        async def toggle() -> None:
            while not stop.is_set():
                await self._on_loop(proxy.stop())
                self.report.faults["database_flaps"] += 1
                await asyncio.sleep(flaps.uniform(0.05, 0.3))
                await self._on_loop(proxy.start())
                await asyncio.sleep(flaps.uniform(0.05, 0.4))

        task: asyncio.Task[None] | None = None

        async def begin() -> None:
            nonlocal task
            task = asyncio.create_task(toggle())

        async def end() -> None:
            stop.set()
            if task is not None:
                await task

        await self._fault("database_flapping", done, begin, end, self.rng.uniform(1.5, 2.5))

    async def _db_black_hole(self, done: asyncio.Event) -> None:
        """A network partition of 1-2 s: connections accepted and kept, nothing forwarded.

        Then the partition heals and the connections resume: TCP retransmits what was sent
        meanwhile (it gives a connection up only after minutes), so the held bytes (and
        closes) arrive late and in order; the server's own deadlines are what must cut the
        statements caught in it. Counted: the connections open when it began, and the chunks
        and closes it held.
        """
        proxy = self.stack.database_proxy
        assert proxy is not None
        held = proxy.held

        async def stall() -> None:
            proxy.stall()
            self.report.faults["database_black_holed_connections"] += proxy.connections

        async def resume() -> None:
            proxy.resume()
            self.report.faults["database_black_hole_held"] += proxy.held - held

        await self._fault(
            "database_black_hole",
            done,
            lambda: self._on_loop(stall()),
            lambda: self._on_loop(resume()),
            self.rng.uniform(1.0, 2.0),
        )

    async def _tokenizer_down(self, done: asyncio.Event) -> None:
        proxy = self.stack.tokenizer_proxy
        assert proxy is not None
        length = self.rng.uniform(1.0, 2.0)
        await self._fault(
            "tokenizer_down",
            done,
            lambda: self._on_loop(proxy.stop()),
            lambda: self._on_loop(proxy.start()),
            length,
        )

    async def _tokenizer_slow(self, done: asyncio.Event) -> None:
        tokenizer = self.stack.tokenizer
        assert tokenizer is not None
        delay = self.rng.choice((0.3, 0.8, 1.6))  # within and beyond the 1 s call timeout

        async def begin() -> None:
            tokenizer.faults.delay = delay

        async def end() -> None:
            tokenizer.faults.delay = 0.0

        await self._fault("tokenizer_slow", done, begin, end, self.rng.uniform(1.0, 2.0))

    async def _tokenizer_wrong_counts(self, done: asyncio.Event) -> None:
        tokenizer = self.stack.tokenizer
        assert tokenizer is not None

        async def begin() -> None:
            tokenizer.faults.wrong_counts = True

        async def end() -> None:
            tokenizer.faults.wrong_counts = False

        await self._fault("tokenizer_wrong_counts", done, begin, end, self.rng.uniform(1.0, 2.0))

    # ---- after the traffic ----

    async def _quiesce(self) -> None:
        """Until Envoy holds no stream, the commits have landed and the server is idle."""
        try:
            await _until(lambda: self._envoy_active() == 0, 15.0)
        except AssertionError:
            self.report.violate("envoy_stream_open", f"{self._envoy_active()} still open")
        await _stable(lambda: asyncio.to_thread(self._row_count), 1.5, 15.0)
        await _stable(self._tasks, 1.0, 15.0)

    def _envoy_active(self) -> int:
        """Requests Envoy still holds, downstream and upstream (its admin requests aside)."""
        text = httpx.get(f"{self.stack.envoy_admin_url}/stats", timeout=5).text
        total = 0
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if name.startswith("http.admin.") or not value.isdigit():
                continue
            if name.endswith(("downstream_rq_active", "upstream_rq_active")):
                total += int(value)
        return total

    def _row_count(self) -> int:
        with psycopg.connect(self.stack.database_url) as conn:
            row = conn.execute("SELECT count(*) FROM prompt_cache_entries").fetchone()
        assert row is not None
        return int(row[0])

    async def _tasks(self) -> int:
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(self.metrics_url)).text
        for line in text.splitlines():
            if line.startswith("extproc_asyncio_tasks") and not line.startswith("#"):
                return int(float(line.rsplit(" ", 1)[1]))
        raise AssertionError(f"no extproc_asyncio_tasks in {self.metrics_url}:\n{text[:2000]}")

    async def _resources(self) -> Resources:
        extproc = self.stack.extproc
        assert extproc is not None
        assert extproc.process is not None
        pid = extproc.process.pid
        tasks = await self._tasks()
        return await asyncio.to_thread(self._process_resources, pid, tasks)

    def _process_resources(self, pid: int, tasks: int) -> Resources:
        process = psutil.Process(pid)
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        sockets = sum(link.startswith("socket:") for link in links)
        connections = process.net_connections(kind="all")
        remote, local = self._peer_ports(), self._local_ports()
        peers: collections.Counter[str] = collections.Counter()
        close_wait = 0
        for conn in connections:
            peer = _peer_name(conn, remote, local)
            peers[peer] += 1
            # A pooled database connection whose server went away waits in CLOSE_WAIT until
            # the pool next hands it out (bounded by the pool's size); the scrape that just
            # read the task count may still be closing.
            if conn.status == psutil.CONN_CLOSE_WAIT and peer not in ("postgres", "scrape"):
                close_wait += 1
        with psycopg.connect(self.stack.database_url) as conn:
            row = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE state <> 'idle') FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert row is not None
        return Resources(
            tasks=tasks,
            fds=len(links),
            sockets=sockets,
            accounted_sockets=len(connections),
            peers=dict(peers),
            close_wait=close_wait,
            pg_sessions=int(row[0]),
            pg_busy=int(row[1]),
        )

    def _local_ports(self) -> dict[int, str]:
        grpc_port = int(self.stack.extproc_address.rpartition(":")[2])
        metrics_port = int(self.metrics_url.split(":")[2].split("/")[0])
        return {grpc_port: "envoy", metrics_port: "scrape"}

    def _peer_ports(self) -> dict[int, str]:
        ports = {}
        if self.stack.database_proxy is not None:
            ports[self.stack.database_proxy.port] = "postgres"
        if self.stack.tokenizer_proxy is not None:
            ports[self.stack.tokenizer_proxy.port] = "tokenizer"
        return ports

    # ---- checks ----

    def _check(self) -> None:
        records = self._records()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(_open(r) for r in records.values()):
            time.sleep(0.2)  # an answer may still be writing to a connection Envoy has closed
            records = self._records()
        for result in self.results:
            result.upstream = records.get(result.planned.tag)
            result.outcome = _outcome(result)
        self.report.requests = len(self.results)
        model = Model(self.results, self.principals)
        for result in self.results:
            self._check_result(model, result)
        self._check_rows(model)
        self._check_upstream(records.values())
        self._check_resources()

    def _records(self) -> dict[str, Record]:
        answer = httpx.get(f"{self.stack.upstream_url}/__fake/requests", timeout=30)
        answer.raise_for_status()
        out = {}
        for data in answer.json():
            record = Record.from_json(data)
            out[record.tag] = record
        return out

    def _degraded_allowed(self, result: Result) -> bool:
        return any(
            w.start <= result.end and result.start <= w.end + RECOVERY_S for w in self.windows
        )

    def _commit_at_risk(self, r: Result) -> bool:
        """A fault began while the commit after ``r`` could still be under way, or went on."""
        return any(
            w.start - COMMIT_DEADLINE_S <= r.end and r.start <= w.end + RECOVERY_S
            for w in self.windows
        )

    def _check_result(self, model: Model, r: Result) -> None:
        p = r.planned
        report = self.report
        report.outcomes[r.outcome.value] += 1
        self._count_faults(r)
        if r.error == "hung":
            report.violate("hung", f"{p.tag} did not end within {HANG_S} s ({p})")
        legit = model.legit(r)
        for value in r.usages:
            report.values[_value_name(value)] += 1
            if value in legit:
                continue
            degraded = value in (Value.INACTIVE, ZERO)
            if degraded and self._degraded_allowed(r):
                report.values["degraded"] += 1
                continue
            kind = "degraded_without_fault" if degraded else "wrong_usage"
            report.violate(kind, f"{p.tag}: got {value}, fault-free {sorted(map(str, legit))}")
        record = r.upstream
        if record is not None and b"cache_control" in record.body:
            report.violate("marker_forwarded", f"{p.tag}: {record.body[:200]!r}")
        if r.outcome is Outcome.SUCCESS and record is not None:
            problem = _edited_beyond_usage(r, record)
            if problem:
                report.violate("bytes_changed", f"{p.tag}: {problem}")

    def _count_faults(self, r: Result) -> None:
        p, record = r.planned, r.upstream
        if p.fault is Fault.UPSTREAM_RESET:
            fired = record is not None and record.aborted and not record.finished
            if fired:
                self.report.faults["upstream_reset"] += 1
        elif p.fault is Fault.CLIENT_DISCONNECT:
            if r.error == "disconnected":
                self.report.faults["client_disconnect"] += 1
        elif p.fault is not Fault.NONE:
            self.report.faults[p.fault.value] += 1

    def _check_rows(self, model: Model) -> None:
        with psycopg.connect(self.stack.database_url) as conn:
            rows = conn.execute(
                "SELECT principal_id, prefix_hash, cumulative_token_count, ttl_tier "
                "FROM prompt_cache_entries"
            ).fetchall()
        self.report.rows = len(rows)
        expected = set(model.expected_rows())
        present = set()
        for principal, prefix, tokens, tier in rows:
            key = (principal, bytes(prefix), tokens, tier)
            present.add((principal, bytes(prefix)))
            if key in expected:
                continue
            if model.row_allowed(principal, bytes(prefix)):
                self.report.violate(
                    "wrong_row", f"{key[:1]} {bytes(prefix).hex()[:16]}: {tokens} {tier}"
                )
            else:
                self.report.violate(
                    "row_without_success", f"{principal[:12]} {bytes(prefix).hex()[:16]}"
                )
        for r in self.results:
            if not self._must_have_committed(model, r):
                continue
            if (model.principal(r), r.shape.prefixes[-1]) not in present:
                self.report.violate("missing_commit", f"{r.planned.tag}: {r.usages}")

    def _must_have_committed(self, model: Model, r: Result) -> bool:
        """A healthy, successful write that reported its creation: its own entry must land."""
        if r.outcome is not Outcome.SUCCESS or not model.accountable(r) or not r.planned.own_block:
            return False
        if self._commit_at_risk(r) or not r.usages:
            return False
        last = r.usages[-1]
        return isinstance(last, tuple) and last in model.legit(r)

    def _check_upstream(self, records: Iterable[Record]) -> None:
        planned = {r.planned.tag: r for r in self.results}
        for record in records:
            if _open(record):
                r = planned.get(record.tag)
                what = f"{r.planned}, client {r.status} {r.error}" if r else "not planned"
                self.report.violate(
                    "upstream_left_open", f"{record.tag}: {len(record.sent)} chunks sent; {what}"
                )

    def _check_resources(self) -> None:
        base, end = self.report.baseline, self.report.final
        assert base is not None
        assert end is not None
        report = self.report
        if end.tasks > base.tasks + TASK_SLACK:
            report.violate("leaked_tasks", f"{base.tasks} -> {end.tasks}")
        other_base, other_end = base.fds - base.sockets, end.fds - end.sockets
        if other_end > other_base + FD_SLACK:
            report.violate("leaked_fds", f"non-socket fds {other_base} -> {other_end}")
        unnamed_base = base.sockets - base.accounted_sockets
        if end.sockets - end.accounted_sockets > unnamed_base + FD_SLACK:
            report.violate("leaked_sockets", f"{base.line()} -> {end.line()}")
        if end.close_wait:
            report.violate("close_wait", end.line())
        if end.peers.get("postgres", 0) > POOL_MAX or end.pg_sessions > POOL_MAX:
            report.violate("database_connections", end.line())
        if end.pg_busy:
            report.violate("database_sessions_busy", end.line())
        if end.peers.get("tokenizer", 0) > self.concurrency + 4:
            report.violate("tokenizer_connections", end.line())
        if end.peers.get("envoy", 0) > ENVOY_CONNECTIONS:
            report.violate("envoy_connections", end.line())
        if end.peers.get("other", 0) > base.peers.get("other", 0):
            report.violate("unknown_connections", f"{base.line()} -> {end.line()}")


def _peer_name(conn: Any, remote: dict[int, str], local: dict[int, str]) -> str:
    """Who a connection of the server is with: its dependencies, Envoy, or someone else."""
    if conn.status == psutil.CONN_LISTEN:
        return "listening"
    if conn.family == socket.AF_UNIX:
        return "unix"
    if conn.raddr and conn.raddr.port in remote:
        return remote[conn.raddr.port]
    if conn.laddr and conn.laddr.port in local:
        return local[conn.laddr.port]
    return "other"


def _open(record: Record) -> bool:
    """The upstream has neither finished nor given up on its answer."""
    return not record.finished and not record.aborted


def _dechunk(data: bytes) -> bytes:
    """An HTTP/1.1 chunked body's content (what arrived of it)."""
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def _is_error_event(event: bytes) -> bool:
    try:
        value = event_json(event)
    except codec.JSONDecodeError:
        return False
    return isinstance(value, dict) and "error" in value


def _outcome(r: Result) -> Outcome:
    p, record = r.planned, r.upstream
    if p.fault in (Fault.UPSTREAM_5XX, Fault.ERROR_FRAME) or record is None:
        return Outcome.FAILED  # the sidecar must veto it, or the upstream never answered
    if r.complete and r.status == 200:
        return Outcome.SUCCESS
    if record.aborted and (p.stream or not _whole_json(record.sent)):
        return Outcome.FAILED  # the upstream never finished its answer
    return Outcome.AMBIGUOUS


def _whole_json(chunks: list[bytes]) -> bool:
    try:
        codec.loads(b"".join(chunks))
    except codec.JSONDecodeError:
        return False
    return True


def _value_name(value: Observed) -> str:
    if isinstance(value, Value):
        return value.value
    if value == ZERO:
        return "zero"
    read, m5, h1 = value
    return {(True, True): "read_and_create", (True, False): "read"}.get(
        (read > 0, m5 + h1 > 0), "create_only"
    )


def _without_usage(value: Any) -> Any:
    return {k: v for k, v in value.items() if k != "usage"} if isinstance(value, dict) else value


def _edited_beyond_usage(r: Result, record: Record) -> str | None:
    """How the client's body differs from the upstream's beyond the usage edit, if it does."""
    sent = b"".join(record.sent)
    if not r.planned.stream:
        got, want = codec.loads(r.body), codec.loads(sent)
        return None if _without_usage(got) == _without_usage(want) else "JSON body changed"
    got_events, want_events = split_events(r.body), split_events(sent)
    if len(got_events) != len(want_events):
        return f"{len(want_events)} events became {len(got_events)}"
    for got, want in zip(got_events, want_events, strict=True):
        if got == want:
            continue
        if _without_usage(event_json(got)) != _without_usage(event_json(want)):
            return f"event {want[:80]!r} became {got[:80]!r}"
    return None


async def _no_faults(done: asyncio.Event) -> None:
    return None


async def _wait(done: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``done`` is set first; whether it was."""
    try:
        await asyncio.wait_for(done.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _until(ready: Callable[[], bool], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not await asyncio.to_thread(ready):
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled within {limit_s} s")
        await asyncio.sleep(0.1)


async def _stable(read: Callable[[], Awaitable[int]], quiet_s: float, limit_s: float) -> None:
    """Until ``read()`` gives the same value for ``quiet_s`` (``limit_s`` at most)."""
    deadline = time.monotonic() + limit_s
    value, since = await read(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        if time.monotonic() > deadline:
            return  # still moving: the checks will say what
        await asyncio.sleep(0.2)
        now = await read()
        if now != value:
            value, since = now, time.monotonic()
