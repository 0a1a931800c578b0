"""Instruments that cost next to nothing to record: plain counters and a histogram timer.

Rules:
* a ``Counts`` is integers keyed by label values, incremented without building an attribute
  dict; an observable counter reads them (a copy, since collection runs in another thread)
  when metrics are collected, and each label set's attribute dict is built once;
* a ``Timer`` records the seconds of its block in a histogram, even when the block fails; a
  ``TracedTimer`` is a ``Timer`` whose block is also a span (tracing on).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation

Key = tuple[str | None, ...]


class Counts:
    """A counter's values by label values (``None``: label left out), observed on collection."""

    def __init__(self, meter: Meter, name: str, labels: tuple[str, ...], description: str) -> None:
        self._labels = labels
        self._values: dict[Key, int] = {}
        self._attributes: dict[Key, dict[str, str]] = {}
        meter.create_observable_counter(name, [self._observe], description=description)

    def add(self, key: Key, amount: int = 1) -> None:
        values = self._values
        values[key] = values.get(key, 0) + amount

    def _observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        for key, value in self._values.copy().items():  # a copy: collection runs in a thread
            yield Observation(value, self._labelled(key))

    def _labelled(self, key: Key) -> dict[str, str]:
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = {k: v for k, v in zip(self._labels, key, strict=True) if v is not None}
            self._attributes[key] = attributes
        return attributes


class Timer:
    """Records the seconds between enter and exit in a histogram, even when the block fails."""

    __slots__ = ("_histogram", "_start")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._histogram.record(time.perf_counter() - self._start)


class TracedTimer:
    """A ``Timer`` whose block is also a span (``span`` is the span's context manager)."""

    __slots__ = ("_span", "_timer")

    def __init__(self, timer: Timer, span: AbstractContextManager[Any]) -> None:
        self._timer = timer
        self._span = span

    def __enter__(self) -> None:
        self._span.__enter__()
        self._timer.__enter__()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._timer.__exit__(kind, exc, tb)
        self._span.__exit__(kind, exc, tb)
