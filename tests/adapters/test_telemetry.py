"""Structured logs and the metrics exporter switch."""

from __future__ import annotations

import logging
import urllib.request

import pytest

from extproc.adapters.telemetry import JsonFormatter, start_metrics
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
