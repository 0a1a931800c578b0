"""The grpc.aio ExternalProcessor: pumps each ``Process`` stream through a core session.

One reply per message, in order. Classification starts as a task when the request body is
accepted (before its reply, so it overlaps the upstream call) and is joined, under the
classify deadline, only where the session asks for it. A join that outlasts what Envoy's
``message_timeout`` allows first sends a message carrying only ``override_message_timeout``,
so a slow dependency ends in "no caching", never in a 504. Commits run after the end-of-stream
reply as tracked tasks under their own deadline. The reply that completes the response carries
the accounting record (``core.record``) as Envoy dynamic metadata. Foreign exceptions are
mapped in ``_classify`` and ``CommitTracker._run`` only; ``asyncio.CancelledError`` always
propagates.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import cast

import grpc
from opentelemetry.trace import Span

from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.adapters import proto, tracing
from extproc.adapters.classifying import Classifying, Deadlines
from extproc.adapters.telemetry import Metrics, log_event
from extproc.core import record
from extproc.core.classify import ClassifyPorts
from extproc.core.defaults import SERVICE_NAME
from extproc.core.errors import DependencyError, SessionStateError
from extproc.core.model import Classification, PendingWrite
from extproc.core.phases import (
    Classified,
    Effect,
    NeedClassification,
    Rejected,
    RequestRead,
    Settled,
    StartClassify,
    Unwatched,
    UsageSent,
)
from extproc.core.ports import PrefixIndex
from extproc.core.session import Session, SessionPolicy
from extproc.core.verdict import VetoReason

log = logging.getLogger("extproc.servicer")
_Context = grpc.aio.ServicerContext[pb.ProcessingRequest, bytes]


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

    def schedule(self, pending: PendingWrite, context: contextvars.Context | None = None) -> None:
        """Commit ``pending`` in a task (run in ``context`` when given: tracing), unless it
        would write nothing now (``not_due``: a debounced refresh)."""
        if not self._index.due(pending):
            self._metrics.commit_result("not_due")
            return
        task = asyncio.get_running_loop().create_task(self._run(pending), context=context)
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

    policy: SessionPolicy
    ports: ClassifyPorts
    deadlines: Deadlines
    commits: CommitTracker
    metrics: Metrics
    # False when the principal is the key's own hash (key_hash): the record then leaves it out.
    record_principal: bool = True


SERVICE = SERVICE_NAME


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
        _requests: AsyncIterator[pb.ProcessingRequest],
        context: _Context,
    ) -> None:
        """Read each message and write its reply (the reader/writer API: no generators)."""
        if self._deps is None:  # abort raises: the stream ends here
            await context.abort(grpc.StatusCode.UNAVAILABLE, "extproc is starting")
        pump = Pump(self._deps, context.write)
        self._deps.metrics.streams_open += 1
        try:
            while True:
                message: object = await context.read()  # the stubs leave out EOF
                if message is grpc.aio.EOF:
                    return
                await context.write(await pump.answer(cast(pb.ProcessingRequest, message)))
                pump.settle()
        except (SessionStateError, proto.ProtocolError) as err:
            log_event(log, logging.ERROR, "protocol error", error=str(err))
            await context.abort(grpc.StatusCode.INTERNAL, f"ext_proc protocol error: {err}")
        finally:
            self._deps.metrics.streams_open -= 1
            pump.close()


# A classification that finished by then is handed over without waiting: on response headers
# an inactive one spares watching the body (when scrubbing is off).
_OFFER_PHASES = frozenset({proto.Phase.RESPONSE_HEADERS, proto.Phase.RESPONSE_BODY})
_NOT_JOINED = Classification.inactive("not_joined")
_NO_JOB = Classification.inactive("no_job")


class Pump:
    """Drives one session: translate, receive, act on the effects, translate back."""

    def __init__(self, deps: Dependencies, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._deps = deps
        self._send = send
        self.session = Session(deps.policy)
        self._classifying: Classifying | None = None
        self._read = False
        self._outcome_recorded = False
        self._span: Span | None = None
        self._found: record.Record | None = None
        self._later: list[Effect] = []
        self._replied: record.Record | None = None

    async def answer(self, message: pb.ProcessingRequest) -> bytes:
        """The reply to ``message``; a join that needs it first sends a timer extension.

        What the reply settles (a commit, a metric) waits for ``settle``, after the reply.
        """
        phase, event = proto.to_event(message)
        tracer = self._deps.metrics.tracer
        if tracer is not None and self._span is None:
            self._span = tracing.start_stream(tracer, proto.trace_carrier(message))
        if phase in _OFFER_PHASES:
            self._offer_if_ready()
        turn = self.session.receive(event)
        self._start(turn.effects)
        step = turn.step
        if isinstance(step, NeedClassification):
            classifying = self._classifying
            if classifying is not None:
                extension = await classifying.wait_briefly()
                if extension is not None:
                    await self._send(extension)
                    await classifying.wait_rest()
            turn = self.session.resolve(self._joined())
            self._start(turn.effects)
            step = turn.step
            if isinstance(step, NeedClassification):
                raise SessionStateError("the session still waits after its classification")
        reply = proto.to_reply(phase, step)
        found = self._record_of(self._later)
        if found is not None:  # the reply that completes the response carries the record
            reply = proto.with_metadata(reply, record.NAMESPACE, found.fields())
        self._replied = found
        return reply

    def settle(self) -> None:
        """The reply went out: do what it settled (metrics, the commit, the record's count)."""
        later, self._later = self._later, []
        self._settle(later)
        found, self._replied = self._replied, None
        if found is not None:
            self._found = found
            if not any(isinstance(e, UsageSent) for e in later):  # the last one, counted once
                self._deps.metrics.recorded(found)

    def close(self) -> None:
        """The stream ended: cancel an unjoined classification; no verdict means no commit."""
        if self._classifying is not None:
            self._classifying.cancel()
        veto = self.session.end().veto
        if veto is not None:
            self._deps.metrics.veto(veto.value)
        if self._read and not self._outcome_recorded and not self._delivered:
            self._deps.metrics.outcome(_NOT_JOINED)
        if self._span is not None:
            self._end_span(self._span, veto)

    def _end_span(self, span: Span, veto: VetoReason | None) -> None:
        span.set_attribute("extproc.request_id", self.session.request_id)
        found = self._found
        if found is not None:
            span.set_attributes(
                {
                    "extproc.outcome": found.outcome,
                    "extproc.reason": found.reason,
                    "extproc.commit": found.commit,
                    "extproc.route": found.route,
                }
            )
        elif veto is not None:
            span.set_attribute("extproc.commit", veto.value)
        span.end()

    def _task_context(self) -> contextvars.Context | None:
        """Where a task of this stream runs: with the stream span when tracing."""
        return None if self._span is None else tracing.task_context(self._span)

    @property
    def _delivered(self) -> bool:
        return self._classifying is not None and self._classifying.delivered

    def _start(self, effects: tuple[Effect, ...]) -> None:
        """Act now on what must happen before the reply; the rest waits for ``settle``."""
        for effect in effects:
            if isinstance(effect, StartClassify):
                self._classifying = Classifying(
                    effect.job,
                    self._deps.ports,
                    self._deps.deadlines,
                    self._deps.metrics,
                    self.session.request_id,
                    self._task_context(),
                )
            else:
                self._later.append(effect)

    def _settle(self, effects: list[Effect]) -> None:
        metrics = self._deps.metrics
        for effect in effects:
            if isinstance(effect, RequestRead):
                self._read = True
                metrics.request(effect.had_markers)
            elif isinstance(effect, Classified):
                self._outcome_recorded = True
                metrics.outcome(effect.classification)
            elif isinstance(effect, Rejected):
                metrics.rejection(effect.error.reason.value)
            elif isinstance(effect, Settled):
                self._record(effect)

    def _record_of(self, effects: list[Effect]) -> record.Record | None:
        """The accounting record when these effects complete the response."""
        dialect = self.session.dialect or record.DEFAULT_DIALECT
        for effect in effects:
            if isinstance(effect, Settled):
                return self._shown(record.of_settled(effect, dialect))
            if isinstance(effect, Unwatched):
                return self._shown(record.of_unwatched(effect, _NOT_JOINED, dialect))
            if isinstance(effect, UsageSent):
                return self._shown(record.of_usage_sent(effect, dialect))
        return None

    def _shown(self, found: record.Record) -> record.Record:
        return found if self._deps.record_principal else replace(found, principal=None)

    def _record(self, settled: Settled) -> None:
        veto = settled.verdict.veto
        if veto is not None and settled.accounted:
            self._deps.metrics.veto(veto.value)
        if settled.pending is not None and not settled.pending.is_empty:
            self._deps.commits.schedule(settled.pending, self._task_context())

    def _offer_if_ready(self) -> None:
        """A classification that finished already is handed over without waiting."""
        classifying = self._classifying
        if classifying is None or not self.session.wants_classification:
            return
        ready = classifying.ready()
        if ready is not None:
            self.session.offer(ready)

    def _joined(self) -> Classification:
        return _NO_JOB if self._classifying is None else self._classifying.result()
