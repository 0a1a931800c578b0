"""A bounded in-process memo of answers: fresh for a TTL, then stale for a while, one load a key.

Rules:
* at most ``max_size`` keys, the least recently used goes first;
* an answer is fresh for ``ttl`` seconds; then, for ``stale_for`` more seconds, it is still
  served at once while one refresh runs in the background, so nobody waits for a slow or
  failing source; a successful refresh replaces it, a failed one leaves it and the next
  refresh waits ``REFRESH_PAUSE_S`` (one failure logged a second, not one a request); after
  that it is gone;
* single flight: concurrent callers of a key that has no answer share one load; a caller
  that gives up (cancelled) hands the load to the others; a failure reaches every caller
  that shared it and is not memoised;
* hits, misses (loads started by a caller), joins (callers that shared a load) and stale
  answers are counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from extproc.core.errors import DependencyError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
Clock = Callable[[], float]
Load = Callable[[], Awaitable[V]]

_log = logging.getLogger(__name__)

REFRESH_PAUSE_S = 1.0


@dataclass(frozen=True, slots=True)
class MemoStats:
    """Counts of a memo (the server exports them as metrics)."""

    hits: int = 0
    misses: int = 0
    size: int = 0
    joined: int = 0
    stale: int = 0


@dataclass(frozen=True, slots=True)
class Memoised(Generic[V]):
    """A memoised answer, when it goes stale and when it may next be refreshed (memo clock)."""

    value: V
    stale_at: float
    refresh_at: float = 0.0


class _Abandoned(DependencyError):
    """The caller running a shared load went away before it ended."""


class TtlMemo(Generic[K, V]):
    """See the module docstring; ``resolve`` is the way in, ``get``/``put`` the plain store."""

    def __init__(
        self, ttl: float, max_size: int, clock: Clock = time.monotonic, stale_for: float = 0.0
    ) -> None:
        if max_size < 1:
            raise ValueError("a memo needs room for at least one entry")
        self._ttl = ttl
        self._stale_for = stale_for
        self._max_size = max_size
        self._clock = clock
        self._items: OrderedDict[K, Memoised[V]] = OrderedDict()
        self._loading: dict[K, asyncio.Future[V]] = {}
        self._refreshing: dict[K, asyncio.Task[V]] = {}
        self.hits = 0
        self.misses = 0
        self.joined = 0
        self.stale = 0

    def get(self, key: K) -> Memoised[V] | None:
        """The fresh answer for ``key``, if any (counted as a hit or a miss)."""
        item = self._items.get(key)
        if item is None or item.stale_at <= self._clock():
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: K, value: V) -> None:
        self._items[key] = Memoised(value, self._clock() + self._ttl)
        self._items.move_to_end(key)
        while len(self._items) > self._max_size:
            self._items.popitem(last=False)

    async def resolve(self, key: K, load: Load[V]) -> V:
        """The answer for ``key``: memoised, stale while refreshing, or from ``load()``."""
        item = self._items.get(key)
        if item is not None:
            late = self._clock() - item.stale_at
            if late < 0:
                self._items.move_to_end(key)
                self.hits += 1
                return item.value
            if late < self._stale_for:
                self.stale += 1
                if item.refresh_at <= self._clock():
                    self._refresh(key, load)
                return item.value
        return await self._load(key, load)

    def stats(self) -> MemoStats:
        return MemoStats(self.hits, self.misses, len(self._items), self.joined, self.stale)

    async def settle(self) -> None:
        """Wait for the background refreshes under way (their failures are logged there)."""
        if self._refreshing:
            await asyncio.wait(set(self._refreshing.values()))

    def _refresh(self, key: K, load: Load[V]) -> None:
        """Start one background load of ``key`` unless one is under way."""
        if key in self._loading or key in self._refreshing:
            return
        task = asyncio.ensure_future(self._load(key, load))
        self._refreshing[key] = task
        task.add_done_callback(lambda done: self._refreshed(key, done))

    def _refreshed(self, key: K, task: asyncio.Task[V]) -> None:
        del self._refreshing[key]
        if task.cancelled() or task.exception() is None:
            return
        _log.warning("memo refresh failed: %s", task.exception())
        item = self._items.get(key)
        if item is not None:
            self._items[key] = replace(item, refresh_at=self._clock() + REFRESH_PAUSE_S)

    async def _load(self, key: K, load: Load[V]) -> V:
        while (shared := self._loading.get(key)) is not None:
            self.joined += 1
            try:
                return await asyncio.shield(shared)
            except _Abandoned:
                continue
        self.misses += 1
        shared = asyncio.get_running_loop().create_future()
        self._loading[key] = shared
        try:
            value = await load()
        except BaseException as exc:
            self._fail(key, shared, exc)
            raise
        del self._loading[key]
        self.put(key, value)
        shared.set_result(value)
        return value

    def _fail(self, key: K, shared: asyncio.Future[V], exc: BaseException) -> None:
        del self._loading[key]
        if isinstance(exc, DependencyError):
            shared.set_exception(type(exc)(str(exc)))
        else:
            shared.set_exception(_Abandoned("the caller loading it went away"))
        shared.exception()  # retrieved: nobody may be sharing it
