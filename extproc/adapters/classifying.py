"""One request's classification in flight: started early, offered when ready, joined in time.

Rules:
* the classification starts as a task when the request body is accepted, so it overlaps the
  upstream call; every failure inside it becomes an inactive outcome (usage left untouched);
* it is joined under the classify deadline, counted from the join; a join that outlasts what
  Envoy's ``message_timeout`` allows first hands out an ``override_message_timeout`` message
  (``wait_briefly``), then waits out the rest (``wait_rest``);
* the task runs in ``context`` when given (tracing: its spans are the stream span's children);
* the result is delivered once, recording its classify result and outcome metrics; a
  classification still running when the stream ends is cancelled (``cancel``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass

from extproc.adapters import proto
from extproc.adapters.telemetry import Metrics, log_event
from extproc.core import defaults
from extproc.core.classify import ClassifyPorts, classify
from extproc.core.model import Classification
from extproc.core.phases import ClassifyJob

log = logging.getLogger("extproc.servicer")

# Reasons worth a warning: the request lost its accounting because something failed.
_DEGRADED = frozenset({"dependency_error", "classify_error", "deadline_exceeded"})
_DEADLINE = Classification.inactive("deadline_exceeded")
_ERROR = Classification.inactive("classify_error")


@dataclass(frozen=True, slots=True)
class Deadlines:
    """How long to wait for a classification at the join, and for one commit.

    A reply may wait ``reply_budget_s`` before Envoy's message timer must be extended; the
    extension covers the rest of the deadline plus ``margin_s``, at most ``max_message_s``.
    """

    classify_s: float = defaults.CLASSIFY_DEADLINE_MS / 1000
    commit_s: float = defaults.COMMIT_DEADLINE_MS / 1000
    reply_budget_s: float = defaults.reply_budget_ms(defaults.ENVOY_MESSAGE_TIMEOUT_MS) / 1000
    margin_s: float = defaults.reply_margin_ms(defaults.ENVOY_MESSAGE_TIMEOUT_MS) / 1000
    max_message_s: float = defaults.ENVOY_MAX_MESSAGE_TIMEOUT_MS / 1000


class Classifying:
    """The classification of one request; see the module rules."""

    def __init__(
        self,
        job: ClassifyJob,
        ports: ClassifyPorts,
        deadlines: Deadlines,
        metrics: Metrics,
        request_id: str,
        context: contextvars.Context | None = None,
    ) -> None:
        self._deadlines = deadlines
        self._metrics = metrics
        self._request_id = request_id
        self._failed = False
        self.delivered = False
        self._join_started = 0.0
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(job, ports), context=context)

    def ready(self) -> Classification | None:
        """The result, if it is there already and not yet delivered."""
        if self.delivered or not self._task.done():
            return None
        return self._deliver("error" if self._failed else "ok", self._task.result())

    async def wait_briefly(self) -> bytes | None:
        """Wait as long as Envoy's timer allows; the extension to send if that was not enough."""
        if self._task.done():
            self._metrics.join("ready")
            return None
        d = self._deadlines
        self._join_started = time.monotonic()
        await asyncio.wait({self._task}, timeout=min(d.classify_s, d.reply_budget_s))
        left = d.classify_s - (time.monotonic() - self._join_started)
        if self._task.done() or left <= 0:
            self._metrics.join("waited")
            return None
        self._metrics.join("extended")
        return proto.extend_timeout(min(d.max_message_s, left + d.margin_s))

    async def wait_rest(self) -> None:
        """After extending Envoy's timer: wait out the rest of the classify deadline."""
        left = self._deadlines.classify_s - (time.monotonic() - self._join_started)
        if not self._task.done():
            await asyncio.wait({self._task}, timeout=max(0.0, left))

    def result(self) -> Classification:
        """The classification after the wait: the result, or the deadline's inactive outcome."""
        ready = self.ready()
        if ready is not None:
            return ready
        self._task.cancel()
        return self._deliver("deadline_exceeded", _DEADLINE)

    def cancel(self) -> None:
        """The stream ended first: stop the work (it commits nothing either way)."""
        if not self.delivered and not self._task.done():
            self._task.cancel()
            self._metrics.classify_result("cancelled")

    async def _run(self, job: ClassifyJob, ports: ClassifyPorts) -> Classification:
        try:
            with self._metrics.timed("classify"):
                return await classify(job.prepared, job.caller, ports)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("classify failed")
            self._failed = True
            return _ERROR

    def _deliver(self, result: str, classification: Classification) -> Classification:
        self.delivered = True
        self._metrics.classify_result(result)
        self._metrics.outcome(classification)
        level = logging.WARNING if classification.reason in _DEGRADED else logging.DEBUG
        log_event(
            log,
            level,
            "classified",
            request_id=self._request_id,
            outcome=classification.outcome.value,
            reason=classification.reason,
        )
        return classification
