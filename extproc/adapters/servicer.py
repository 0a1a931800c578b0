"""The grpc.aio ExternalProcessor: pumps each ``Process`` stream through a core session.

One reply per message, in order. Classification starts as a task when the request body is
accepted (before its reply, so it overlaps the upstream call) and is joined, under the
classify deadline, only where the session asks for it. A join that outlasts what Envoy's
``message_timeout`` allows first sends a message carrying only ``override_message_timeout``,
so a slow dependency ends in "no caching", never in a 504. Commits run after the end-of-stream
reply as tracked tasks under their own deadline. Foreign exceptions are mapped in ``_classify``
and ``CommitTracker._run`` only; ``asyncio.CancelledError`` always propagates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.adapters import proto
from extproc.adapters.telemetry import Metrics, log_event
from extproc.core import session as s
from extproc.core.classify import ClassifyPorts, classify
from extproc.core.errors import ClientError, DependencyError, SessionStateError
from extproc.core.model import Classification, PendingWrite
from extproc.core.ports import PrefixIndex
from extproc.core.verdict import Verdict, VetoReason

log = logging.getLogger("extproc.servicer")
_Context = grpc.aio.ServicerContext[pb.ProcessingRequest, bytes]


@dataclass(frozen=True, slots=True)
class Deadlines:
    """How long to wait for a classification at the join, and for one commit.

    A reply may wait ``reply_budget_s`` before Envoy's message timer must be extended; the
    extension covers the rest of the deadline plus ``margin_s``, at most ``max_message_s``.
    """

    classify_s: float = 5.0
    commit_s: float = 2.0
    reply_budget_s: float = 1.5
    margin_s: float = 0.5
    max_message_s: float = 30.0


class CommitTracker:
    """Runs commits off the response path and lets shutdown wait for the pending ones."""

    def __init__(self, index: PrefixIndex, deadline_s: float, metrics: Metrics) -> None:
        self._index = index
        self._deadline_s = deadline_s
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def schedule(self, pending: PendingWrite) -> None:
        task = asyncio.get_running_loop().create_task(self._run(pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for pending commits; cancel the rest and return their count."""
        if not self._tasks:
            return 0
        _done, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        return len(late)

    async def _run(self, pending: PendingWrite) -> None:
        result = "ok"
        try:
            with self._metrics.timed("commit"):
                async with asyncio.timeout(self._deadline_s):
                    await self._index.commit(pending)
        except TimeoutError:
            result = "deadline_exceeded"
        except DependencyError as err:
            result = "error"
            log_event(log, logging.WARNING, "commit failed", error=type(err).__name__)
        except asyncio.CancelledError:
            self._metrics.commit_result("cancelled")
            raise
        except Exception:
            result = "error"
            log.exception("commit failed unexpectedly")
        self._metrics.commit_result(result)


@dataclass(frozen=True, slots=True)
class Dependencies:
    """What every stream shares."""

    policy: s.SessionPolicy
    ports: ClassifyPorts
    deadlines: Deadlines
    commits: CommitTracker
    metrics: Metrics


SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def add_to_server(processor: ExternalProcessor, server: grpc.aio.Server) -> None:
    """Register ``processor``; replies go out as the bytes ``proto`` serialised (no re-encoding)."""
    handler = grpc.stream_stream_rpc_method_handler(
        processor.Process,
        request_deserializer=pb.ProcessingRequest.FromString,
        response_serializer=_as_is,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Process": handler}),)
    )


def _as_is(reply: bytes) -> bytes:
    return reply


class ExternalProcessor:
    """``envoy.service.ext_proc.v3.ExternalProcessor``: one pump per ``Process`` stream."""

    def __init__(self, deps: Dependencies | None = None) -> None:
        self._deps = deps

    def ready(self, deps: Dependencies) -> None:
        """Start answering streams (until then each is refused with ``UNAVAILABLE``)."""
        self._deps = deps

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: _Context,
    ) -> AsyncIterator[bytes]:
        if self._deps is None:  # abort raises: the stream ends here
            await context.abort(grpc.StatusCode.UNAVAILABLE, "extproc is starting")
        pump = Pump(self._deps)
        try:
            async for message in request_iterator:
                async for reply in pump.answer(message):
                    yield reply
                pump.after_reply()
        except (SessionStateError, proto.ProtocolError) as err:
            log_event(log, logging.ERROR, "protocol error", error=str(err))
            await context.abort(grpc.StatusCode.INTERNAL, f"ext_proc protocol error: {err}")
        finally:
            pump.close()


# A classification that finished by then is handed over without waiting: on response headers
# an inactive one spares watching the body (one message for JSON, one per chunk for SSE).
_OFFER_PHASES = frozenset({proto.Phase.RESPONSE_HEADERS, proto.Phase.RESPONSE_BODY})

# Reasons worth a warning: the request lost its accounting because something failed.
_DEGRADED = frozenset({"dependency_error", "classify_error", "deadline_exceeded"})


class Pump:
    """Drives one session: translate, receive, join classify when asked, translate back."""

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps
        self.session = s.Session(deps.policy)
        self._task: asyncio.Task[Classification] | None = None
        self._classify_failed = False
        self._finished = False
        self._outcome_recorded = False
        self._join_started = 0.0

    async def answer(self, message: pb.ProcessingRequest) -> AsyncIterator[bytes]:
        """The reply to ``message``, after a timer extension when the join needs one."""
        phase, event = proto.to_event(message)
        if phase in _OFFER_PHASES:
            self._offer_if_ready()
        step = self.session.receive(event)
        if phase is proto.Phase.REQUEST_BODY and self.session.prepared is not None:
            self._deps.metrics.request(self.session.prepared.had_markers)
        self._start_classify()
        if isinstance(step, s.NeedClassification):
            extension = await self._wait_briefly()
            if extension is not None:
                yield extension
                await self._wait_rest()
            step = self.session.resolve(self._joined())
        yield proto.to_reply(phase, step)

    def after_reply(self) -> None:
        """Record what the reply settled; schedule the commit once the verdict is known."""
        if self._finished:
            return
        session = self.session
        if session.rejected is not None:
            self._record_rejection(session.rejected)
        elif session.verdict is not None:
            self._record_verdict(session.verdict)
            pending = session.pending_commit
            if pending is not None:
                self._deps.commits.schedule(pending)
        else:
            return
        self._finished = True

    def close(self) -> None:
        """The stream ended: cancel an unjoined classification; no verdict means no commit."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            self._deps.metrics.classify_result("cancelled")
        if not self._finished and self.session.has_job and self.session.is_awaiting_response:
            self._deps.metrics.veto(VetoReason.NO_END_OF_STREAM.value)
        if self.session.prepared is not None and not self._outcome_recorded:
            classification = self.session.classification
            self._deps.metrics.outcome(classification or Classification.inactive("not_joined"))

    def _start_classify(self) -> None:
        job = self.session.take_job()
        if job is None:
            return
        self._task = asyncio.get_running_loop().create_task(self._classify(job))

    async def _classify(self, job: s.ClassifyJob) -> Classification:
        """Classify with every failure mapped to an inactive outcome (usage left untouched)."""
        try:
            with self._deps.metrics.timed("classify"):
                return await classify(job.prepared, job.caller, self._deps.ports)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("classify failed")
            self._classify_failed = True
            return Classification.inactive("classify_error")

    def _offer_if_ready(self) -> None:
        """A classification that finished already is handed over without waiting."""
        task = self._task
        if task is not None and task.done() and self.session.wants_classification:
            self.session.offer(self._collect(task))

    async def _wait_briefly(self) -> bytes | None:
        """Wait as long as Envoy's timer allows; the extension to send if that was not enough."""
        task, d = self._task, self._deps.deadlines
        if task is None or task.done():
            return None
        self._join_started = time.monotonic()
        await asyncio.wait({task}, timeout=min(d.classify_s, d.reply_budget_s))
        left = d.classify_s - (time.monotonic() - self._join_started)
        if task.done() or left <= 0:
            return None
        return proto.extend_timeout(min(d.max_message_s, left + d.margin_s))

    async def _wait_rest(self) -> None:
        """After extending Envoy's timer: wait out the rest of the classify deadline."""
        task, d = self._task, self._deps.deadlines
        if task is not None and not task.done():
            left = d.classify_s - (time.monotonic() - self._join_started)
            await asyncio.wait({task}, timeout=max(0.0, left))

    def _joined(self) -> Classification:
        """The classification once the wait is over: the result, or the deadline's verdict."""
        task = self._task
        if task is None:
            return Classification.inactive("no_job")
        if task.done():
            return self._collect(task)
        task.cancel()
        self._task = None
        self._deps.metrics.classify_result("deadline_exceeded")
        return self._outcome(Classification.inactive("deadline_exceeded"))

    def _collect(self, task: asyncio.Task[Classification]) -> Classification:
        self._task = None
        self._deps.metrics.classify_result("error" if self._classify_failed else "ok")
        return self._outcome(task.result())

    def _outcome(self, result: Classification) -> Classification:
        self._deps.metrics.outcome(result)
        self._outcome_recorded = True
        level = logging.WARNING if result.reason in _DEGRADED else logging.DEBUG
        log_event(
            log,
            level,
            "classified",
            request_id=self.session.request_id,
            outcome=result.outcome.value,
            reason=result.reason,
        )
        return result

    def _record_rejection(self, err: ClientError) -> None:
        self._deps.metrics.rejection(err.reason.value)

    def _record_verdict(self, verdict: Verdict) -> None:
        if verdict.veto is not None and self.session.has_job:
            self._deps.metrics.veto(verdict.veto.value)
