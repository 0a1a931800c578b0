"""When a worker that exited is started again, and when the group gives up: pure, no processes.

Rules:

* Each worker slot waits before its restart: ``first_delay_s``, doubled after every exit up to
  ``max_delay_s``; a worker that had been up for ``stable_after_s`` starts its slot over at
  ``first_delay_s``.
* Every exit counts, whatever its code or signal. The group gives up when ``max_crashes``
  exits fall within ``window_s`` of each other, counted over all slots.
* Until the group has once been at full strength, any exit gives up at once: a worker that
  cannot start (a bad tokenizer file, a taken port) would fail the same way again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

EXIT_GAVE_UP = 3
"""The parent's exit code when it gave up on its workers."""


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How long to wait before restarting a worker, and how many exits are too many."""

    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    stable_after_s: float = 60.0
    max_crashes: int = 5
    window_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Restart:
    """Start the slot's worker again after ``delay_s``."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop every worker and exit: ``reason`` says why, for the log."""

    reason: str


class Restarts:
    """The exit history of one group of ``size`` workers and what each new exit calls for."""

    def __init__(self, size: int, policy: RestartPolicy = RestartPolicy()) -> None:
        self._policy = policy
        self._delays = [policy.first_delay_s] * size
        self._exits: deque[float] = deque()
        self._has_served = False

    def at_full_strength(self) -> None:
        """Every worker is serving: from now on an exit is a crash to restart."""
        self._has_served = True

    def exited(self, slot: int, now: float, uptime_s: float) -> Restart | GiveUp:
        """Worker ``slot`` exited at ``now`` (seconds) after ``uptime_s`` seconds up."""
        if not self._has_served:
            return GiveUp("a worker exited before the group first reached full strength")
        policy = self._policy
        self._exits.append(now)
        while self._exits[0] <= now - policy.window_s:
            self._exits.popleft()
        if len(self._exits) >= policy.max_crashes:
            return GiveUp(f"{len(self._exits)} worker exits within {policy.window_s:g} s")
        if uptime_s >= policy.stable_after_s:
            self._delays[slot] = policy.first_delay_s
        delay = self._delays[slot]
        self._delays[slot] = min(delay * 2, policy.max_delay_s)
        return Restart(delay)
