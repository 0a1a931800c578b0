"""The restart policy: backoff per slot, its reset, the crash budget and start failures."""

from __future__ import annotations

import pytest

from extproc.restarts import GiveUp, Restart, RestartPolicy, Restarts

Exit = tuple[int, float, float]  # slot, when it exited, how long it had been up
WIDE = RestartPolicy(max_crashes=100)  # a budget that never runs out, to watch the delays


def _decide(policy: RestartPolicy, exits: list[Exit]) -> list[float | str]:
    """The delay of each restart, or ``"give up"``, for ``exits`` in a group of three."""
    restarts = Restarts(3, policy)
    restarts.at_full_strength()
    out: list[float | str] = []
    for slot, now, uptime in exits:
        decision = restarts.exited(slot, now, uptime)
        out.append(decision.delay_s if isinstance(decision, Restart) else "give up")
    return out


CASES = [
    pytest.param(WIDE, [(0, 1, 1)], [0.5], id="first-restart-waits-half-a-second"),
    pytest.param(
        WIDE,
        [(0, t * 100, 1) for t in range(9)],
        [0.5, 1, 2, 4, 8, 16, 30, 30, 30],
        id="doubles-up-to-thirty-seconds",
    ),
    pytest.param(
        WIDE, [(0, 1, 1), (0, 3, 1), (0, 200, 120)], [0.5, 1, 0.5], id="stable-worker-resets"
    ),
    pytest.param(
        WIDE, [(0, 1, 1), (0, 3, 1), (0, 200, 59)], [0.5, 1, 2], id="not-quite-stable-keeps-on"
    ),
    pytest.param(
        WIDE, [(0, 1, 1), (1, 2, 1), (0, 3, 1), (2, 4, 1)], [0.5, 0.5, 1, 0.5], id="per-slot"
    ),
    pytest.param(
        RestartPolicy(),
        [(0, 0, 1), (0, 2, 1), (0, 4, 1), (0, 8, 1), (0, 13, 1)],
        [0.5, 1, 2, 4, "give up"],
        id="fifth-exit-within-a-minute-gives-up",
    ),
    pytest.param(
        RestartPolicy(),
        [(0, 0, 1), (1, 1, 1), (2, 2, 1), (0, 3, 1), (1, 4, 1)],
        [0.5, 0.5, 0.5, 1, "give up"],
        id="the-budget-is-shared-by-the-slots",
    ),
    pytest.param(
        RestartPolicy(),
        [(0, 0, 1), (0, 10, 1), (0, 20, 1), (0, 30, 1), (0, 60, 1), (0, 61, 1)],
        [0.5, 1, 2, 4, 8, "give up"],
        id="exits-older-than-the-window-do-not-count",
    ),
    pytest.param(
        RestartPolicy(),
        [(0, t * 61, 61) for t in range(8)],
        [0.5] * 8,
        id="a-crash-a-minute-is-restarted-forever",
    ),
]


@pytest.mark.parametrize(("policy", "exits", "expected"), CASES)
def test_decisions(policy: RestartPolicy, exits: list[Exit], expected: list[float | str]) -> None:
    assert _decide(policy, exits) == expected


def test_an_exit_before_full_strength_gives_up_at_once() -> None:
    restarts = Restarts(2)
    decision = restarts.exited(1, now=5.0, uptime_s=5.0)
    assert isinstance(decision, GiveUp)
    assert "before the group first reached full strength" in decision.reason


def test_the_reason_counts_the_exits() -> None:
    restarts = Restarts(1, RestartPolicy(max_crashes=2, window_s=10))
    restarts.at_full_strength()
    assert restarts.exited(0, 0, 1) == Restart(0.5)
    assert restarts.exited(0, 1, 1) == GiveUp("2 worker exits within 10 s")
