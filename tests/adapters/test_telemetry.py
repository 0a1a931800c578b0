"""Structured logs, the metrics exporter switch, and what the metrics export."""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc.adapters.breaker import Breaker, BreakerPolicy, CircuitOpen
from extproc.adapters.index_memo import IndexMemoStats
from extproc.adapters.memo import MemoStats
from extproc.adapters.telemetry import (
    METER_NAME,
    JsonFormatter,
    Metrics,
    meter_provider,
    start_metrics,
)
from extproc.core import codec
from extproc.core.model import Classification, Outcome, Split, Tier


def record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("extproc.test", logging.WARNING, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_log_lines_are_json_with_their_fields() -> None:
    line = JsonFormatter().format(record("classified", outcome="read", port=5, odd=Tier.M5))
    entry = codec.loads(line)
    assert entry["msg"] == "classified"
    assert entry["level"] == "warning"
    assert entry["logger"] == "extproc.test"
    assert (entry["outcome"], entry["port"], entry["odd"]) == ("read", 5, "Tier.M5")


def test_exceptions_carry_their_type_and_trace() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = codec.loads(JsonFormatter().format(rec))
    assert entry["error"] == "ValueError"
    assert "boom" in entry["trace"]


@pytest.mark.parametrize("enabled", [pytest.param(True, id="on"), pytest.param(False, id="off")])
def test_metrics_endpoint(enabled: bool) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics, server = start_metrics("127.0.0.1" if enabled else None, port)
    try:
        split = Split(read=3, creation={Tier.H1: 4})
        metrics.outcome(Classification(Outcome.READ_AND_CREATE, split, model="m"))
        if not enabled:
            with pytest.raises(OSError, match="Connection refused"):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
            return
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        assert sample(text, "extproc_outcomes_total", 'outcome="read_and_create"') == 1
        assert sample(text, "extproc_tokens_total", 'kind="creation"', 'tier="1h"') == 4
        assert sample(text, "extproc_tokens_total", 'kind="read"') == 3
    finally:
        server.close()


def sample(text: str, name: str, *labels: str) -> float:
    """The value of the one sample of ``name`` whose labels include every one of ``labels``."""
    [value] = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(label in line for label in labels)
    ]
    return value


def collected(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The values of metric ``name`` by sorted label pairs, as a scrape would see them."""
    data = reader.get_metrics_data()
    values: dict[tuple[tuple[str, str], ...], float] = {}
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    labels = tuple(sorted((k, str(v)) for k, v in point.attributes.items()))
                    values[labels] = point.value  # type: ignore[union-attr]
    return values


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def metrics(reader: InMemoryMetricReader) -> Metrics:
    return Metrics(meter_provider((reader,)).get_meter(METER_NAME))


def test_counters_are_read_when_collected(metrics: Metrics, reader: InMemoryMetricReader) -> None:
    for _ in range(3):
        metrics.classify_result("ok")
    metrics.classify_result("deadline_exceeded")
    metrics.request(True)
    assert collected(reader, "extproc.classify_results") == {
        (("result", "ok"),): 3,
        (("result", "deadline_exceeded"),): 1,
    }
    metrics.classify_result("ok")
    assert collected(reader, "extproc.classify_results")[(("result", "ok"),)] == 4
    assert collected(reader, "extproc.requests") == {(("markers", "true"),): 1}
    assert collected(reader, "extproc.commit_vetoes") == {}


def test_a_model_label_only_for_confirmed_models(
    metrics: Metrics, reader: InMemoryMetricReader
) -> None:
    metrics.outcome(Classification.inactive("unknown_principal"))
    metrics.outcome(Classification(Outcome.CREATE_ONLY, Split(creation={Tier.M5: 7}), model="m"))
    assert collected(reader, "extproc.outcomes") == {
        (("outcome", "inactive"),): 1,
        (("model", "m"), ("outcome", "create_only")): 1,
    }
    assert collected(reader, "extproc.tokens") == {
        (("kind", "creation"), ("model", "m"), ("tier", "5m")): 7
    }


def test_breaker_states_are_exported(metrics: Metrics, reader: InMemoryMetricReader) -> None:
    database = Breaker("database", BreakerPolicy(failures=1, cooldown_s=60.0))
    service = Breaker("tokenizer_service", BreakerPolicy())
    metrics.observe_breakers([database, service])
    database.failed()
    with pytest.raises(CircuitOpen):
        database.admit()
    assert collected(reader, "extproc.breaker_state") == {
        (("dependency", "database"),): 2,
        (("dependency", "tokenizer_service"),): 0,
    }
    assert collected(reader, "extproc.breaker_refusals")[(("dependency", "database"),)] == 1


def test_index_memo_and_resolver_memos_are_exported(
    metrics: Metrics, reader: InMemoryMetricReader
) -> None:
    metrics.observe_index(lambda: IndexMemoStats(hits=5, misses=2, refreshes_skipped=4))
    metrics.observe_memos({"principal": lambda: MemoStats(hits=9, misses=1, joined=3, stale=2)})
    assert collected(reader, "extproc.index_memo") == {
        (("result", "hit"),): 5,
        (("result", "miss"),): 2,
    }
    assert collected(reader, "extproc.index_refreshes")[(("result", "skipped"),)] == 4
    cache = collected(reader, "extproc.resolver_cache")
    assert cache[(("resolver", "principal"), ("result", "joined"))] == 3
    assert cache[(("resolver", "principal"), ("result", "stale"))] == 2


def test_timed_records_even_when_the_block_fails(
    metrics: Metrics, reader: InMemoryMetricReader
) -> None:
    with pytest.raises(ValueError, match="boom"), metrics.timed("lookup"):
        raise ValueError("boom")
    with metrics.timed("lookup"):
        pass
    data = reader.get_metrics_data()
    assert data is not None
    [histogram] = [
        m
        for r in data.resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
        if m.name == "extproc.lookup.duration"
    ]
    assert histogram.data.data_points[0].count == 2  # type: ignore[union-attr]


async def test_task_count_of_the_loop_is_exported(
    metrics: Metrics, reader: InMemoryMetricReader
) -> None:
    metrics.observe_tasks(asyncio.get_running_loop())
    before = collected(reader, "extproc.asyncio_tasks")[()]
    waiting = [asyncio.create_task(asyncio.sleep(60)) for _ in range(3)]
    try:
        assert collected(reader, "extproc.asyncio_tasks")[()] == before + 3
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    assert collected(reader, "extproc.asyncio_tasks")[()] == before
