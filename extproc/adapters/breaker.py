"""Circuit breakers: after a few consecutive failures of a dependency, stop asking for a while.

Rules:
* one breaker per dependency per worker process; it sees every call's outcome;
* ``failures`` consecutive failures open it; while open every call fails at once with
  ``CircuitOpen`` (a ``DependencyError``, so the request degrades as it would have anyway);
* after ``cooldown_s`` it is half-open: the next call goes through as the one probe, the
  others still fail at once; the probe's success closes it, its failure opens it again;
* a success resets the count; a probe that ends without an outcome (cancelled) hands the
  probe to the next call;
* ``UnmappedModel`` is an answer, not a failure.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from extproc.core.errors import DependencyError, UnmappedModel

T = TypeVar("T")
Clock = Callable[[], float]

_log = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    """Where a breaker stands; ``level`` is what the state metric reports."""

    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def level(self) -> int:
        return _LEVELS[self]


_LEVELS = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """How many consecutive failures open a breaker, and for how long it stays open."""

    failures: int = 5
    cooldown_s: float = 2.0

    def __post_init__(self) -> None:
        if self.failures < 1 or self.cooldown_s < 0:
            raise ValueError("a breaker needs at least one failure and a non-negative cooldown")


class CircuitOpen(DependencyError):
    """The dependency's breaker is open: the call was not made."""


class Breaker:
    """One dependency's breaker; ``call`` runs work through it."""

    def __init__(self, name: str, policy: BreakerPolicy, clock: Clock = time.monotonic) -> None:
        self.name = name
        self._policy = policy
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self.opened = 0  # how many times it opened
        self.refused = 0  # calls failed at once while open

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probing or self._clock() - self._opened_at >= self._policy.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    async def call(self, work: Callable[[], Awaitable[T]]) -> T:
        """``work()`` if the breaker lets it through; its outcome moves the breaker."""
        probe = self.admit()
        try:
            result = await work()
        except UnmappedModel:
            self.succeeded()
            raise
        except DependencyError:
            self.failed()
            raise
        except BaseException:
            self._release(probe)
            raise
        self.succeeded()
        return result

    def admit(self) -> bool:
        """Let a call through (``True`` when it is the probe) or raise ``CircuitOpen``."""
        if self._opened_at is None:
            return False
        if self.state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        self.refused += 1
        raise CircuitOpen(f"{self.name}: circuit open after {self._failures} failures")

    def succeeded(self) -> None:
        if self._opened_at is not None:
            _log.info("%s: circuit closed", self.name)
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failed(self) -> None:
        self._failures += 1
        reopening = self._opened_at is not None
        if reopening or self._failures >= self._policy.failures:
            if not reopening:
                self.opened += 1
                _log.warning("%s: circuit opened after %d failures", self.name, self._failures)
            self._opened_at = self._clock()
        self._probing = False

    def _release(self, probe: bool) -> None:
        if probe:
            self._probing = False


async def through(breaker: Breaker | None, work: Callable[[], Awaitable[T]]) -> T:
    """``work()`` through ``breaker``, or directly when there is none."""
    if breaker is None:
        return await work()
    return await breaker.call(work)
