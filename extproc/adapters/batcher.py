"""Concurrent submissions coalesced into batches, run by a few long-lived flushers.

Rules:
* a submitted item waits in a queue; an idle flusher takes everything queued (at most
  ``max_batch`` items) and runs it as one batch; at most ``flushers`` batches run at once, so
  while they run, new items gather for the next batch (no task is created per item or batch);
* a submitter awaits only its own item's future, under its own deadline: at the deadline, or
  when it is cancelled, it stops waiting at once; an item given up before a flusher took it
  is left out of the batch;
* ``run`` answers a batch with one result per item, in order; a ``DependencyError`` fails
  them all, any other exception is a bug: logged, and the items fail with a
  ``DependencyError``;
* ``aclose`` stops the flushers; an item still queued, or submitted later, fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from extproc.core.errors import DependencyError

Item = TypeVar("Item")
Result = TypeVar("Result")

_log = logging.getLogger(__name__)
_Queued = tuple[Item, "asyncio.Future[Result]"]


class Batcher(Generic[Item, Result]):
    """Runs submitted items through ``run`` in batches; see the module docstring."""

    def __init__(
        self,
        name: str,
        run: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        *,
        flushers: int = 2,
        max_batch: int = 64,
    ) -> None:
        self._name = name
        self._run = run
        self._flushers = flushers
        self._max_batch = max_batch
        self._queue: deque[_Queued[Item, Result]] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.batches = 0
        self.items = 0

    async def submit(self, item: Item, limit: float) -> Result:
        """Queue ``item``; its result, once its batch ran (waiting ``limit`` seconds at most)."""
        if self._closed:
            raise DependencyError(f"{self._name}: closed")
        loop = asyncio.get_running_loop()
        if not self._tasks:
            self._start(loop)
        done: asyncio.Future[Result] = loop.create_future()
        self._queue.append((item, done))
        self._wake_one()
        try:
            async with asyncio.timeout(limit):
                return await done
        except TimeoutError:
            raise DependencyError(f"{self._name}: no answer within {limit:g}s") from None

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Stop the flushers (a batch under way gets ``grace_s`` to end); fail what is queued."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        while self._queue:
            _item, done = self._queue.popleft()
            if not done.done():
                done.set_exception(DependencyError(f"{self._name}: closed"))

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        for number in range(self._flushers):
            name = f"extproc-{self._name}-{number}"
            self._tasks.append(loop.create_task(self._flush_forever(), name=name))

    def _wake_one(self) -> None:
        while self._idle:
            wake = self._idle.popleft()
            if not wake.done():
                wake.set_result(None)
                return

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._take()
            if batch:
                await self._flush(batch)
                continue
            wake: asyncio.Future[None] = loop.create_future()
            self._idle.append(wake)
            await wake

    def _take(self) -> list[_Queued[Item, Result]]:
        batch: list[_Queued[Item, Result]] = []
        while self._queue and len(batch) < self._max_batch:
            queued = self._queue.popleft()
            if not queued[1].done():
                batch.append(queued)
        return batch

    async def _flush(self, batch: list[_Queued[Item, Result]]) -> None:
        self.batches += 1
        self.items += len(batch)
        results: Sequence[Result] = ()
        failure: str | None = f"{self._name}: closed"
        try:
            results = await self._run([item for item, _ in batch])
            failure = None if len(results) == len(batch) else f"{self._name}: results lost"
        except DependencyError as exc:
            failure = str(exc)
        except Exception:
            _log.exception("%s: batch failed unexpectedly", self._name)
            failure = f"{self._name}: batch failed"
        finally:
            _settle(batch, results, failure)


def _settle(
    batch: list[_Queued[Item, Result]], results: Sequence[Result], failure: str | None
) -> None:
    """Each waiting item's outcome: its result, or failed with ``failure``."""
    for index, (_item, done) in enumerate(batch):
        if done.done():
            continue
        if failure is None:
            done.set_result(results[index])
        else:
            done.set_exception(DependencyError(failure))
