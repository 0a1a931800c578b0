"""The circuit breaker's state machine, driven by a fake clock and work that fails on demand."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from extproc.adapters.breaker import Breaker, BreakerPolicy, BreakerState, CircuitOpen
from extproc.core.errors import DependencyError, UnmappedModel


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Work:
    """Counts its calls; raises ``error`` when set."""

    error: BaseException | None = None
    calls: int = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return "answer"


def breaker(clock: Clock, failures: int = 3, cooldown: float = 2.0) -> Breaker:
    return Breaker("dep", BreakerPolicy(failures, cooldown), clock)


async def fail(b: Breaker, work: Work, times: int) -> None:
    work.error = DependencyError("down")
    for _ in range(times):
        with pytest.raises(DependencyError, match="down"):
            await b.call(work)


async def test_consecutive_failures_open_it_and_calls_fail_at_once() -> None:
    clock, work = Clock(), Work()
    b = breaker(clock)
    await fail(b, work, 3)
    assert b.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen, match="dep: circuit open after 3 failures"):
        await b.call(work)
    assert (work.calls, b.refused, b.opened) == (3, 1, 1)


async def test_a_success_resets_the_count() -> None:
    clock, work = Clock(), Work()
    b = breaker(clock)
    await fail(b, work, 2)
    work.error = None
    assert await b.call(work) == "answer"
    await fail(b, work, 2)
    assert b.state is BreakerState.CLOSED


async def test_after_the_cooldown_one_probe_goes_through_and_closes_it() -> None:
    clock, work = Clock(), Work()
    b = breaker(clock)
    await fail(b, work, 3)
    clock.now += 1.9
    assert b.state is BreakerState.OPEN
    clock.now += 0.1
    assert b.state is BreakerState.HALF_OPEN
    work.error = None
    assert await b.call(work) == "answer"
    assert b.state is BreakerState.CLOSED
    assert await b.call(work) == "answer"


async def test_a_failed_probe_opens_it_for_another_cooldown() -> None:
    clock, work = Clock(), Work()
    b = breaker(clock)
    await fail(b, work, 3)
    clock.now += 2.0
    await fail(b, work, 1)
    assert b.state is BreakerState.OPEN
    clock.now += 1.9
    with pytest.raises(CircuitOpen):
        await b.call(work)
    assert b.opened == 1


async def test_only_one_probe_at_a_time() -> None:
    clock = Clock()
    b = breaker(clock, failures=1)
    await fail(b, Work(), 1)
    clock.now += 2.0
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "probe"

    probe = asyncio.create_task(b.call(slow))
    await asyncio.sleep(0)
    with pytest.raises(CircuitOpen):
        await b.call(Work())
    gate.set()
    assert await probe == "probe"
    assert b.state is BreakerState.CLOSED


async def test_a_cancelled_probe_hands_the_probe_on() -> None:
    clock = Clock()
    b = breaker(clock, failures=1)
    await fail(b, Work(), 1)
    clock.now += 2.0
    probe = asyncio.create_task(b.call(asyncio.Event().wait))
    await asyncio.sleep(0)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert await b.call(Work()) == "answer"
    assert b.state is BreakerState.CLOSED


async def test_an_unmapped_model_is_an_answer_not_a_failure() -> None:
    clock, work = Clock(), Work(error=UnmappedModel("no such model"))
    b = breaker(clock, failures=1)
    for _ in range(3):
        with pytest.raises(UnmappedModel):
            await b.call(work)
    assert b.state is BreakerState.CLOSED


async def test_bugs_are_not_dependency_failures() -> None:
    clock, work = Clock(), Work(error=ValueError("a bug"))
    b = breaker(clock, failures=1)
    with pytest.raises(ValueError, match="a bug"):
        await b.call(work)
    assert b.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("failures", "cooldown"),
    [pytest.param(0, 1.0, id="no-failures"), pytest.param(1, -1.0, id="negative-cooldown")],
)
def test_policy_rejects_nonsense(failures: int, cooldown: float) -> None:
    with pytest.raises(ValueError, match="breaker"):
        BreakerPolicy(failures, cooldown)
