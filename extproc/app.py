"""Composition root: build the ports, run the gRPC server, shut down in order.

Start: metrics, the gRPC server (health ``NOT_SERVING``), the database pool (retried until it
opens), ports, sweeper, then health ``SERVING`` and one ``serving`` log line. Stop (SIGTERM or
SIGINT): health ``NOT_SERVING``, stop accepting and finish in-flight streams within the grace,
wait for pending commits in what is left of it, then close the sweeper, tokenizer and pool.
With several workers (``extproc.workers``) each is such a process, and its health also reports
``NOT_SERVING`` while the group is below strength.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.adapters import postgres, servicer
from extproc.adapters.breaker import Breaker, BreakerPolicy
from extproc.adapters.classifying import Deadlines
from extproc.adapters.index_memo import IndexMemo, MemoPolicy
from extproc.adapters.pg_index import PgPrefixIndex
from extproc.adapters.pg_resolvers import PgModelConfigResolver, build_principal_resolver
from extproc.adapters.telemetry import (
    Metrics,
    TimedTokenizer,
    configure_logging,
    log_event,
    start_metrics,
)
from extproc.adapters.tokenizers import build_tokenizer
from extproc.adapters.tokenizers_remote import RemoteTimeouts
from extproc.config import HostPort, Settings
from extproc.core.classify import ClassifyPorts
from extproc.core.defaults import SERVICE_NAME, reply_budget_ms, reply_margin_ms
from extproc.core.errors import DependencyError, ExtprocError
from extproc.core.session import SessionPolicy
from extproc.workers import Link, Supervisor

log = logging.getLogger("extproc.app")

HEALTH_SERVICES = ("", SERVICE_NAME)
POOL_RETRY_S = 1.0
_Serving = health_pb2.HealthCheckResponse.SERVING
_NotServing = health_pb2.HealthCheckResponse.NOT_SERVING


class ListenError(ExtprocError):
    """The server cannot bind its listen address (in use, no permission, bad path)."""


Builder = Callable[[Metrics], Awaitable[servicer.Dependencies]]
"""Builds the servicer's dependencies once the server listens (tests inject fakes here)."""


@dataclass
class Resources:
    """What ``start`` opened and ``stop`` closes, in reverse order."""

    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        while self.closers:
            closer = self.closers.pop()
            try:
                await closer()
            except Exception:
                log.exception("error while closing")


class App:
    """One server process."""

    def __init__(
        self, settings: Settings, *, reuse_port: bool = False, build: Builder | None = None
    ) -> None:
        self.settings = settings
        self.port = 0
        self._reuse_port = reuse_port
        self._builder = build
        self._health = health.aio.HealthServicer()
        self._processor = servicer.ExternalProcessor(None)
        self._server = grpc.aio.server(options=self._grpc_options())
        self._resources = Resources()
        self._commits: servicer.CommitTracker | None = None
        self._status: int = _NotServing  # this process's own readiness
        self._full = True  # the worker group is at full strength (always, for one process)

    def _grpc_options(self) -> list[tuple[str, Any]]:
        limit = self.settings.grpc_message_limit
        return [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            # Envoy keeps its ext_proc connections alive with HTTP/2 pings (every 30 s in the
            # provided configs), idle ones too: accept them instead of answering too_many_pings.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
        ]

    async def start(self, metrics: Metrics) -> None:
        """Listen (health ``NOT_SERVING``), open dependencies, then report ``SERVING``."""
        servicer.add_to_server(self._processor, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        await self._set_health(_NotServing)
        self.port = self._listen()
        await self._server.start()
        deps = await (self._builder or self._build)(metrics)
        self._commits = deps.commits
        self._processor.ready(deps)
        gc.freeze()  # what start-up built lives as long as the process: no collection walks it
        await self._set_health(_Serving)
        log_event(log, logging.INFO, "serving", address=self.address, port=self.port)

    def _listen(self) -> int:
        try:
            return self._server.add_insecure_port(self.settings.listen)
        except RuntimeError as err:  # grpc's only report of a failed bind
            raise ListenError(f"cannot listen on {self.settings.listen}: {err}") from err

    @property
    def address(self) -> str:
        listen = self.settings.listen
        if listen.startswith("unix:"):
            return listen
        return f"{listen.rpartition(':')[0]}:{self.port}"

    async def _build(self, metrics: Metrics) -> servicer.Dependencies:
        s = self.settings
        policy = BreakerPolicy(s.breaker_failures, s.breaker_cooldown_s)
        database, service = Breaker("database", policy), Breaker("tokenizer_service", policy)
        timeouts = replace(tokenizer_timeouts(s), models_stale_for=s.stale_for_s)
        tokenizer = build_tokenizer(
            s.tokenizer_url, dict(s.tokenizers), timeouts, s.tokenizer_queue, service
        )
        self._resources.closers.append(tokenizer.aclose)
        await asyncio.to_thread(tokenizer.validate)  # a bad file fails the start, not a request
        pool = await _open_pool_retrying(s.database_url)
        self._resources.closers.append(pool.close)
        principals = build_principal_resolver(
            s.principal_source, pool, stale_for=s.stale_for_s, breaker=database
        )
        models = PgModelConfigResolver(pool, stale_for=s.stale_for_s, breaker=database)
        self._start_sweeper(pool)
        index = PgPrefixIndex(pool, memo=index_memo(s), breaker=database, timed=metrics.timed)
        self._resources.closers.append(index.aclose)
        metrics.observe_memos({"principal": principals.memo_stats, "model": models.memo_stats})
        metrics.observe_index(index.memo.stats)
        metrics.observe_breakers([database, service] if s.tokenizer_url else [database])
        metrics.observe_tokenizer_queue(lambda: tokenizer.embedded.rejected)
        self._commits = servicer.CommitTracker(index, s.commit_deadline_ms / 1000, metrics)
        ports = ClassifyPorts(
            principals, models, index, TimedTokenizer(tokenizer, metrics), s.engine_cache
        )
        return servicer.Dependencies(
            policy=self._session_policy(),
            ports=ports,
            deadlines=deadlines(s),
            commits=self._commits,
            metrics=metrics,
        )

    def _start_sweeper(self, pool: postgres.Pool) -> None:
        if self.settings.sweep_interval_s <= 0:
            return
        sweeper = postgres.ExpirySweeper(pool, interval=self.settings.sweep_interval_s)
        sweeper.start()
        self._resources.closers.append(sweeper.stop)

    def _session_policy(self) -> SessionPolicy:
        header = self.settings.principal_source.header
        return SessionPolicy(
            request=self.settings.request_policy,
            max_body_bytes=self.settings.max_body_bytes,
            caller_headers=frozenset() if header is None else frozenset({header}),
            scrub=self.settings.scrub_provider_cache,
        )

    async def stop(self) -> None:
        """Graceful stop within ``shutdown_grace_s``; see the module docstring for the order."""
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.settings.shutdown_grace_s)
        if self._commits is not None:
            late = await self._commits.drain(max(0.0, deadline - time.monotonic()))
            if late:
                log_event(log, logging.WARNING, "commits abandoned at shutdown", count=late)
        await self._resources.close()

    async def set_strength(self, full: bool) -> None:
        """Whether every worker of the group serves: below strength, health is NOT_SERVING."""
        self._full = full
        await self._set_health(self._status)

    async def _set_health(self, status: int) -> None:
        self._status = status
        shown = status if self._full else _NotServing
        for name in HEALTH_SERVICES:
            await self._health.set(name, shown)


def tokenizer_timeouts(settings: Settings) -> RemoteTimeouts:
    """The tokenizer service's call timeout (connecting never takes longer than the call);
    retries of an unavailable service stay inside the classify deadline."""
    total = settings.tokenizer_timeout_ms / 1000
    return RemoteTimeouts(
        connect=min(total, RemoteTimeouts().connect),
        total=total,
        retry_window=settings.classify_deadline_ms / 1000,
    )


def index_memo(settings: Settings) -> IndexMemo:
    """The index memo the settings describe (serving TTL, refresh debounce, size)."""
    policy = MemoPolicy(
        ttl=settings.index_memo_ttl_s,
        debounce=settings.refresh_debounce_pct / 100,
        max_size=settings.index_memo_size,
    )
    return IndexMemo(policy)


def deadlines(settings: Settings) -> Deadlines:
    """The join and commit deadlines, and how Envoy's message timer bounds a reply."""
    timeout = settings.envoy_message_timeout_ms
    return Deadlines(
        classify_s=settings.classify_deadline_ms / 1000,
        commit_s=settings.commit_deadline_ms / 1000,
        reply_budget_s=reply_budget_ms(timeout) / 1000,
        margin_s=reply_margin_ms(timeout) / 1000,
        max_message_s=settings.envoy_max_message_timeout_ms / 1000,
    )


def _hits(stats: Any) -> tuple[int, int]:
    return int(stats.hits), int(stats.misses)


async def _open_pool_retrying(url: str) -> postgres.Pool:
    """Open the pool, retrying while the database is unavailable (health stays NOT_SERVING)."""
    while True:
        try:
            return await postgres.open_pool(url)
        except DependencyError as err:
            log_event(log, logging.WARNING, "database unavailable, retrying", error=str(err))
            await asyncio.sleep(POOL_RETRY_S)


async def run(settings: Settings, *, reuse_port: bool = False, link: Link | None = None) -> None:
    """Serve until SIGTERM or SIGINT (a worker: or until its parent is gone), then stop."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    metrics_host = settings.metrics_listen.host if settings.metrics_listen else None
    metrics_port = settings.metrics_listen.port if settings.metrics_listen else 0
    metrics, metrics_server = start_metrics(metrics_host, metrics_port)
    app = App(settings, reuse_port=reuse_port)
    follower = None if link is None else await link.join(app.set_strength, stopping.set)
    try:
        await _until(stopping, app.start(metrics))
        if link is not None and not stopping.is_set() and not link.report_ready():
            stopping.set()
        await stopping.wait()
        log_event(log, logging.INFO, "stopping", grace_s=settings.shutdown_grace_s)
    finally:
        if follower is not None:
            follower.cancel()
        await app.stop()
        metrics_server.close()
        log_event(log, logging.INFO, "stopped")


async def _until(stopping: asyncio.Event, work: Awaitable[None]) -> None:
    """Run ``work`` unless ``stopping`` is set first (then cancel it)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait({task})  # waits for the cancellation without absorbing our own
        return
    task.result()


def main(settings: Settings) -> int:
    """Run one server process, or supervise ``workers`` processes; return the exit code."""
    configure_logging(settings.log_level)
    if settings.workers == 1:
        asyncio.run(run(settings))
        return 0
    return Supervisor(_run_worker, settings).run()


def _run_worker(settings: Settings, index: int, conn: Connection) -> None:
    configure_logging(settings.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM
    link = Link(conn)
    try:
        asyncio.run(run(_worker_settings(settings, index), reuse_port=True, link=link))
    except ExtprocError as exc:
        log_event(log, logging.ERROR, "worker failed", worker=index, error=str(exc))
        raise SystemExit(1) from None


def _worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index`` exports its metrics on the configured port plus ``index``."""
    metrics = settings.metrics_listen
    if metrics is not None and metrics.port:
        metrics = HostPort(metrics.host, metrics.port + index)
    return replace(settings, metrics_listen=metrics, workers=1)
