"""The commit verdict: whether a response completed the way billing counts a success.

Rules:
* commit only when the status is 2xx, the body reached its end of stream, no error object or
  frame was seen, every event could be framed, the stream's final event arrived where its
  API has one (``message_stop``, ``response.completed``) and a usage object was seen
  (DESIGN §4.4, §12);
* otherwise the veto is the first failed check in ``_CHECKS`` order (the root cause first: a
  stream cut short also lacks its usage frame), and its value is the metric label.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class VetoReason(enum.Enum):
    """Why a response does not commit, as the commit-veto metric label spells it."""

    NON_2XX = "non_2xx"
    NO_END_OF_STREAM = "no_end_of_stream"
    ERROR_FRAME = "error_frame"
    OVERSIZED_EVENT = "oversized_event"
    NO_FINAL_EVENT = "no_final_event"
    NO_USAGE = "no_usage"


@dataclass(frozen=True, slots=True)
class ResponseFacts:
    """What the response showed: the status and the facts gathered from its body."""

    status: int
    end_of_stream: bool
    usage_seen: bool
    error_seen: bool = False
    oversized: bool = False
    completed: bool = True


@dataclass(frozen=True, slots=True)
class Verdict:
    """Commit, or the reason not to; ``veto`` is ``None`` exactly when ``commit`` is true."""

    commit: bool
    veto: VetoReason | None = None


COMMIT = Verdict(commit=True)

_CHECKS: tuple[tuple[VetoReason, Callable[[ResponseFacts], bool]], ...] = (
    (VetoReason.NON_2XX, lambda f: 200 <= f.status < 300),
    (VetoReason.NO_END_OF_STREAM, lambda f: f.end_of_stream),
    (VetoReason.ERROR_FRAME, lambda f: not f.error_seen),
    (VetoReason.OVERSIZED_EVENT, lambda f: not f.oversized),
    (VetoReason.NO_FINAL_EVENT, lambda f: f.completed),
    (VetoReason.NO_USAGE, lambda f: f.usage_seen),
)


def decide(facts: ResponseFacts) -> Verdict:
    """The commit verdict for one response (DESIGN §4.4)."""
    for veto, passes in _CHECKS:
        if not passes(facts):
            return Verdict(commit=False, veto=veto)
    return COMMIT
