"""The batcher: concurrent submissions coalesced, per-item results, deadlines, failures, close."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from extproc.adapters.batcher import Batcher
from extproc.core.errors import DependencyError


@dataclass
class Doubler:
    """Answers each item with its double; a batch waits for ``gate``; records every batch."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    batches: list[list[int]] = field(default_factory=list)
    error: Exception | None = None

    def __post_init__(self) -> None:
        self.gate.set()

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return [2 * item for item in items]


async def held() -> tuple[Doubler, Batcher[int, int], asyncio.Task[int]]:
    """A one-flusher batcher whose first batch (item 1) runs and waits for the gate."""
    run = Doubler()
    run.gate.clear()
    batcher = Batcher("double", run, flushers=1)
    first = asyncio.create_task(batcher.submit(1, 10))
    await run.started.wait()
    return run, batcher, first


async def test_concurrent_items_share_a_batch_and_get_their_own_results() -> None:
    run = Doubler()
    batcher = Batcher("double", run, flushers=1)
    assert await asyncio.gather(*(batcher.submit(i, 10) for i in range(5))) == [0, 2, 4, 6, 8]
    assert run.batches == [[0, 1, 2, 3, 4]]
    await batcher.aclose()


async def test_items_gather_while_a_batch_runs() -> None:
    run, batcher, first = await held()
    later = [asyncio.create_task(batcher.submit(i, 10)) for i in (2, 3, 4)]
    await asyncio.sleep(0)
    run.gate.set()
    assert [await t for t in (first, *later)] == [2, 4, 6, 8]
    assert run.batches == [[1], [2, 3, 4]]
    await batcher.aclose()


async def test_at_most_max_batch_items_a_batch() -> None:
    run = Doubler()
    batcher = Batcher("double", run, flushers=1, max_batch=2)
    await asyncio.gather(*(batcher.submit(i, 10) for i in range(5)))
    assert run.batches == [[0, 1], [2, 3], [4]]
    await batcher.aclose()


async def test_an_item_given_up_before_its_batch_is_left_out() -> None:
    run, batcher, first = await held()
    gone = asyncio.create_task(batcher.submit(2, 10))
    kept = asyncio.create_task(batcher.submit(3, 10))
    await asyncio.sleep(0)
    gone.cancel()
    run.gate.set()
    assert (await first, await kept) == (2, 6)
    assert gone.cancelled()
    assert run.batches == [[1], [3]]
    await batcher.aclose()


async def test_a_submitter_stops_waiting_at_its_deadline() -> None:
    run = Doubler()
    run.gate.clear()
    batcher = Batcher("double", run, flushers=1)
    with pytest.raises(DependencyError, match=r"double: no answer within 0\.05s"):
        await batcher.submit(1, 0.05)
    run.gate.set()
    await batcher.aclose()


async def test_a_failed_batch_fails_each_of_its_items() -> None:
    run = Doubler(error=DependencyError("database down"))
    batcher = Batcher("double", run, flushers=1)
    results = await asyncio.gather(
        *(batcher.submit(i, 10) for i in range(3)), return_exceptions=True
    )
    assert [str(r) for r in results] == ["database down"] * 3
    assert all(isinstance(r, DependencyError) for r in results)
    await batcher.aclose()


async def test_a_bug_is_logged_and_fails_the_items_as_a_dependency_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = Doubler(error=ValueError("a bug"))
    batcher = Batcher("double", run, flushers=1)
    with pytest.raises(DependencyError, match="double: batch failed"):
        await batcher.submit(1, 10)
    assert "batch failed unexpectedly" in caplog.text
    run.error = None
    assert await batcher.submit(2, 10) == 4  # the flusher survived
    await batcher.aclose()


async def test_close_fails_what_is_queued_and_what_comes_later() -> None:
    _run, batcher, running = await held()
    queued = asyncio.create_task(batcher.submit(2, 10))
    await asyncio.sleep(0)
    await batcher.aclose()
    for task in (running, queued):
        with pytest.raises(DependencyError, match="double: closed"):
            await task
    with pytest.raises(DependencyError, match="double: closed"):
        await batcher.submit(3, 10)
