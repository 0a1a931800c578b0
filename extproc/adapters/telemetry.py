"""Metrics through OpenTelemetry (exported for Prometheus) and structured JSON logs.

Labels never carry a principal, key, hash or raw client input: ``model`` is set only for
cache-enabled models (the alias a classification confirmed), everything else is an enum value.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

from extproc.core import codec
from extproc.core.model import (
    Classification,
    IndexHit,
    PendingWrite,
    PrefixHash,
    Scope,
    Tier,
    TokenCounts,
)
from extproc.core.ports import PrefixIndex, Tokenizer

METER_NAME = "extproc"
# Seconds; the interesting range is sub-millisecond lookups up to multi-second commits.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5)


class Metrics:
    """Every instrument the server records; see the module docstring for the label rules."""

    def __init__(self, meter: Meter) -> None:
        self._requests = meter.create_counter(
            "extproc.requests", description="Chat requests with a JSON body, by marker presence"
        )
        self._outcomes = meter.create_counter("extproc.outcomes", description="Request outcomes")
        self._rejections = meter.create_counter(
            "extproc.marker_rejections", description="Requests rejected for their cache markers"
        )
        self._classify_results = meter.create_counter(
            "extproc.classify_results", description="How classification ended"
        )
        self._commit_results = meter.create_counter(
            "extproc.commit_results", description="How commits ended"
        )
        self._vetoes = meter.create_counter(
            "extproc.commit_vetoes", description="Responses that did not commit, by reason"
        )
        self._meter = meter
        self._tokens = meter.create_counter(
            "extproc.tokens", description="Prompt tokens accounted as cache read or creation"
        )
        self._durations = {
            name: meter.create_histogram(f"extproc.{name}.duration", unit="s")
            for name in ("classify", "lookup", "tokenizer", "commit")
        }

    def request(self, had_markers: bool) -> None:
        self._requests.add(1, {"markers": str(had_markers).lower()})

    def rejection(self, reason: str) -> None:
        self._rejections.add(1, {"reason": reason})

    def outcome(self, classification: Classification) -> None:
        self._outcomes.add(1, _model_attrs(classification, outcome=classification.outcome.value))
        split = classification.split
        if split is None or classification.model is None:
            return
        model = {"model": classification.model}
        if split.read:
            self._tokens.add(
                split.read, {**model, "kind": "read", "tier": _read_tier(classification)}
            )
        for tier in Tier:
            if split.created(tier):
                self._tokens.add(
                    split.created(tier), {**model, "kind": "creation", "tier": tier.value}
                )

    def classify_result(self, result: str) -> None:
        self._classify_results.add(1, {"result": result})

    def commit_result(self, result: str) -> None:
        self._commit_results.add(1, {"result": result})

    def veto(self, reason: str) -> None:
        self._vetoes.add(1, {"reason": reason})

    def observe_caches(self, caches: Mapping[str, Callable[[], tuple[int, int]]]) -> None:
        """Export resolver memo hits and misses, read from ``caches[name]() -> (hits, misses)``."""

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            for name, read in caches.items():
                hits, misses = read()
                yield Observation(hits, {"resolver": name, "result": "hit"})
                yield Observation(misses, {"resolver": name, "result": "miss"})

        self._meter.create_observable_counter(
            "extproc.resolver_cache", [observe], description="Resolver memo lookups"
        )

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record the duration of the block in the ``name`` histogram, even when it fails."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._durations[name].record(time.perf_counter() - start)


def _read_tier(classification: Classification) -> str:
    """The tier of the entry that was read (its refresh), ``unknown`` when not recorded."""
    pending = classification.pending
    refresh = pending.refresh if pending is not None else None
    return refresh.tier.value if refresh is not None else "unknown"


def _model_attrs(classification: Classification, **attrs: str) -> dict[str, str]:
    if classification.model is not None:
        attrs["model"] = classification.model
    return attrs


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


def start_metrics(host: str | None, port: int) -> tuple[Metrics, MetricsServer]:
    """Metrics exported on ``host:port`` for Prometheus; ``host=None`` records nothing out."""
    if host is None:
        provider = meter_provider(())
        return Metrics(provider.get_meter(METER_NAME)), MetricsServer(None, provider)
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    provider = meter_provider((PrometheusMetricReader(),))
    server, _thread = start_http_server(port, addr=host)
    return Metrics(provider.get_meter(METER_NAME)), MetricsServer(server, provider)


# ---- timed ports ----


@dataclass(frozen=True, slots=True)
class TimedIndex:
    """The prefix index with its lookups timed (commits are timed by their tracker)."""

    inner: PrefixIndex
    metrics: Metrics

    async def lookup(self, scope: Scope, hashes: Sequence[PrefixHash]) -> Sequence[IndexHit]:
        with self.metrics.timed("lookup"):
            return await self.inner.lookup(scope, hashes)

    async def commit(self, pending: PendingWrite) -> None:
        await self.inner.commit(pending)


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
