"""Metrics through OpenTelemetry (exported for Prometheus) and structured JSON logs.

Labels never carry a principal, key, hash or raw client input: ``model`` is set only for
cache-enabled models (the alias a classification confirmed), everything else is an enum value.

Recording costs no attribute dict and no call into the SDK: counters are plain integers keyed
by their label values, which observable counters read when metrics are collected; durations
go to histograms without attributes. With a tracer (``OTEL_*`` configured traces), every timed
step is also a span; without one, timing costs one ``None`` check more.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.trace import Tracer

from extproc.adapters.breaker import Breaker
from extproc.adapters.counters import Counts, Timer, TracedTimer
from extproc.adapters.index_memo import IndexMemoStats
from extproc.adapters.memo import MemoStats
from extproc.adapters.tracing import SPAN_NAMES
from extproc.core import codec
from extproc.core.model import Classification, TokenCounts
from extproc.core.ports import Tokenizer
from extproc.core.record import Record

METER_NAME = "extproc"
# Seconds; the interesting range is sub-millisecond lookups up to multi-second commits.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5)

_MARKERS = {True: ("true",), False: ("false",)}


class Metrics:
    """Every instrument the server records; see the module docstring for the label rules."""

    def __init__(self, meter: Meter, tracer: Tracer | None = None) -> None:
        self._meter = meter
        self.tracer = tracer
        self._requests = Counts(
            meter, "extproc.requests", ("markers",), "Chat requests with a JSON body, by markers"
        )
        self._outcomes = Counts(meter, "extproc.outcomes", ("outcome", "model"), "Outcomes")
        self._rejections = Counts(
            meter, "extproc.marker_rejections", ("reason",), "Requests rejected for their markers"
        )
        self._classify_results = Counts(
            meter, "extproc.classify_results", ("result",), "How classification ended"
        )
        self._commit_results = Counts(
            meter, "extproc.commit_results", ("result",), "How commits ended"
        )
        self._vetoes = Counts(
            meter, "extproc.commit_vetoes", ("reason",), "Responses that did not commit, by reason"
        )
        self._tokens = Counts(
            meter,
            "extproc.tokens",
            ("model", "kind", "tier"),
            "Prompt tokens accounted as cache read or creation",
        )
        self._reads = Counts(
            meter,
            "extproc.read_tokens",
            ("model", "source"),
            "Prompt tokens reported to clients as cache reads, by read source (index or engine)",
        )
        self._joins = Counts(
            meter,
            "extproc.joins",
            ("wait",),
            "Joins of a classification: ready at once, waited, or waited past Envoy's timer",
        )
        self.streams_open = 0
        meter.create_observable_up_down_counter(
            "extproc.streams_in_flight",
            [lambda _options: (Observation(self.streams_open),)],
            description="ext_proc streams open now",
        )
        self._durations = {
            name: meter.create_histogram(f"extproc.{name}.duration", unit="s")
            for name in ("classify", "lookup", "tokenizer", "commit")
        }

    def request(self, had_markers: bool) -> None:
        self._requests.add(_MARKERS[had_markers])

    def rejection(self, reason: str) -> None:
        self._rejections.add((reason,))

    def outcome(self, classification: Classification) -> None:
        model = classification.model
        self._outcomes.add((classification.outcome.value, model))
        split = classification.split
        if split is None or model is None:
            return
        if split.read:
            self._tokens.add((model, "read", _read_tier(classification)), split.read)
        for tier, tokens in split.creation.items():
            if tokens:
                self._tokens.add((model, "creation", tier.value), tokens)

    def recorded(self, found: Record) -> None:
        """The split the client saw: read tokens by where the read came from."""
        if found.split.read and found.model is not None:
            self._reads.add((found.model, found.read_source.value), found.split.read)

    def join(self, wait: str) -> None:
        """A join of a classification: ``ready``, ``waited`` or ``extended`` (timer extended)."""
        self._joins.add((wait,))

    def classify_result(self, result: str) -> None:
        self._classify_results.add((result,))

    def commit_result(self, result: str) -> None:
        self._commit_results.add((result,))

    def veto(self, reason: str) -> None:
        self._vetoes.add((reason,))

    def observe_caches(self, caches: Mapping[str, Callable[[], tuple[int, int]]]) -> None:
        """Export resolver memo hits and misses, read from ``caches[name]() -> (hits, misses)``."""

        def stats(read: Callable[[], tuple[int, int]]) -> Callable[[], MemoStats]:
            return lambda: MemoStats(*read())

        self.observe_memos({name: stats(read) for name, read in caches.items()})

    def observe_memos(self, memos: Mapping[str, Callable[[], MemoStats]]) -> None:
        """Export resolver memos: hits, misses (queries), shared queries and stale answers."""

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            for name, read in memos.items():
                stats = read()
                for result, value in _memo_results(stats):
                    yield Observation(value, {"resolver": name, "result": result})

        self._meter.create_observable_counter(
            "extproc.resolver_cache", [observe], description="Resolver memo lookups"
        )

    def observe_index(self, read: Callable[[], IndexMemoStats]) -> None:
        """Export the index memo: lookups answered from memory, refreshes written or skipped."""

        def lookups(_options: CallbackOptions) -> Iterable[Observation]:
            stats = read()
            yield Observation(stats.hits, {"result": "hit"})
            yield Observation(stats.misses, {"result": "miss"})

        def refreshes(_options: CallbackOptions) -> Iterable[Observation]:
            stats = read()
            yield Observation(stats.refreshes_written, {"result": "written"})
            yield Observation(stats.refreshes_skipped, {"result": "skipped"})

        meter = self._meter
        meter.create_observable_counter("extproc.index_memo", [lookups], description="Lookups")
        meter.create_observable_counter(
            "extproc.index_refreshes", [refreshes], description="Sliding refreshes of reads"
        )

    def observe_breakers(self, breakers: Sequence[Breaker]) -> None:
        """Export each breaker's state (0 closed, 1 half-open, 2 open) and calls it refused."""

        def states(_options: CallbackOptions) -> Iterable[Observation]:
            for breaker in breakers:
                yield Observation(breaker.state.level, {"dependency": breaker.name})

        def refused(_options: CallbackOptions) -> Iterable[Observation]:
            for breaker in breakers:
                yield Observation(breaker.refused, {"dependency": breaker.name})

        meter = self._meter
        meter.create_observable_gauge(
            "extproc.breaker_state", [states], description="0 closed, 1 half-open, 2 open"
        )
        meter.create_observable_counter(
            "extproc.breaker_refusals", [refused], description="Calls failed at once while open"
        )

    def observe_tokenizer_queue(self, rejected: Callable[[], int]) -> None:
        """Export the tokenizations refused because the queue in front of the pool was full."""

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            yield Observation(rejected())

        self._meter.create_observable_counter(
            "extproc.tokenizer_rejections", [observe], description="Counts refused: queue full"
        )

    def observe_tasks(self, loop: asyncio.AbstractEventLoop) -> None:
        """Export how many asyncio tasks the server's loop holds (counted when scraped)."""

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            yield Observation(len(asyncio.all_tasks(loop)))

        self._meter.create_observable_gauge(
            "extproc.asyncio_tasks", [observe], description="Tasks alive on the event loop"
        )

    def observe_tokenizer_retries(self, retries: Callable[[], int]) -> None:
        """Export the tokenizer service calls retried (after a 503 or a dropped connection)."""

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            yield Observation(retries())

        self._meter.create_observable_counter(
            "extproc.tokenizer_retries", [observe], description="Tokenizer service retries"
        )

    def timed(self, name: str) -> AbstractContextManager[None]:
        """Record the duration of the block in the ``name`` histogram, even when it fails.

        With tracing on, the block is also a span, a child of the current one.
        """
        timer = Timer(self._durations[name])
        if self.tracer is None:
            return timer
        return TracedTimer(timer, self.tracer.start_as_current_span(SPAN_NAMES[name]))


def _memo_results(stats: MemoStats) -> tuple[tuple[str, int], ...]:
    return (
        ("hit", stats.hits),
        ("miss", stats.misses),
        ("joined", stats.joined),
        ("stale", stats.stale),
    )


def _read_tier(classification: Classification) -> str:
    """The tier of the entry that was read (its refresh), ``unknown`` when not recorded."""
    pending = classification.pending
    refresh = pending.refresh if pending is not None else None
    return refresh.tier.value if refresh is not None else "unknown"


def meter_provider(readers: Sequence[MetricReader]) -> MeterProvider:
    """A provider with second-scale histogram buckets for every duration instrument."""
    view = View(
        instrument_name="extproc.*.duration",
        aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS),
    )
    return MeterProvider(metric_readers=list(readers), views=[view])


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """The Prometheus scrape endpoint; ``close`` stops it."""

    server: Any
    provider: MeterProvider

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.provider.shutdown()


def start_metrics(
    host: str | None, port: int, tracer: Tracer | None = None
) -> tuple[Metrics, MetricsServer]:
    """Metrics exported on ``host:port`` for Prometheus; ``host=None`` records nothing out.

    ``tracer`` (tracing on) makes every timed step a span as well.
    """
    if host is None:
        provider = meter_provider(())
        return Metrics(provider.get_meter(METER_NAME), tracer), MetricsServer(None, provider)
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    provider = meter_provider((PrometheusMetricReader(),))
    server, _thread = start_http_server(port, addr=host)
    return Metrics(provider.get_meter(METER_NAME), tracer), MetricsServer(server, provider)


# ---- timed tokenizer ----


@dataclass(frozen=True, slots=True)
class TimedTokenizer:
    """The tokenizer with its counts timed."""

    inner: Tokenizer
    metrics: Metrics

    async def version(self, alias: str) -> str | None:
        return await self.inner.version(alias)

    async def count(self, alias: str, segments: Sequence[str]) -> TokenCounts:
        with self.metrics.timed("tokenizer"):
            return await self.inner.count(alias, segments)


# ---- logs ----

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update((k, _plain(v)) for k, v in vars(record).items() if k not in _RESERVED)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
            entry["trace"] = self.formatException(record.exc_info)
        return codec.dumps(entry).decode()


def _plain(value: Any) -> Any:
    """``value`` when JSON can carry it as is, else its ``str``."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def configure_logging(level: str) -> None:
    """JSON lines on stderr: ours at ``level``, libraries' (grpc, psycopg) from WARNING up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("extproc").setLevel(level)


def log_event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with ``fields``; callers pass ids and labels, never secrets or prompts."""
    logger.log(level, message, extra=fields)
