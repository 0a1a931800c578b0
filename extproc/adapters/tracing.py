"""OpenTelemetry traces: off unless the standard ``OTEL_*`` variables ask for an OTLP exporter.

Rules:
* tracing is on when ``OTEL_TRACES_EXPORTER`` is ``otlp``, or when it is unset and an OTLP
  endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); ``OTEL_SDK_DISABLED=true`` or
  ``OTEL_TRACES_EXPORTER=none`` keep it off. Off, nothing is imported and no span is made;
* the exporter (``http/protobuf`` by default, ``grpc`` when ``OTEL_EXPORTER_OTLP_PROTOCOL`` or
  its traces variant says so) is imported only when tracing is on; the exporter reads the rest
  of its ``OTEL_EXPORTER_OTLP_*`` settings itself; the service name is ``OTEL_SERVICE_NAME``
  or ``extproc``;
* one span per ext_proc stream (``ext_proc stream``), a child of the caller's ``traceparent``
  when the request carries one, with the request id; classify, index lookup, tokenize and
  commit are its children (tasks started with ``task_context`` carry the stream span);
* spans carry ids, labels and counts, never a key or prompt text.
"""

from __future__ import annotations

import contextvars
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from extproc.core.errors import ExtprocError

TRACER_NAME = "extproc"
DEFAULT_SERVICE = "extproc"
STREAM_SPAN = "ext_proc stream"
# The span of each timed step (``Metrics.timed`` names).
SPAN_NAMES = {
    "classify": "classify",
    "lookup": "index lookup",
    "tokenizer": "tokenize",
    "commit": "commit",
}
_EXPORTERS = {
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
}
_PROPAGATOR = TraceContextTextMapPropagator()


class TracingConfigError(ExtprocError):
    """The ``OTEL_*`` variables ask for tracing this installation cannot do."""


def is_enabled(env: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces (see the module rules)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter == "otlp"
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return any(env.get(name, "").strip() for name in endpoints)


def protocol(env: Mapping[str, str]) -> str:
    """The OTLP protocol of the traces exporter."""
    chosen = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    chosen = chosen.strip().lower()
    if chosen not in _EXPORTERS:
        raise TracingConfigError(f"OTLP protocol {chosen!r}: expected one of {sorted(_EXPORTERS)}")
    return chosen


def describe(env: Mapping[str, str]) -> str | dict[str, str]:
    """What the variables configure, for ``serve --check``: ``"off"``, or the protocol, the
    endpoint (its host and path only) and the exporter module; raises ``TracingConfigError``
    when the traces asked for cannot be sent (unknown protocol, exporter not installed)."""
    if not is_enabled(env):
        return "off"
    chosen = protocol(env)
    module = _exporter_module(chosen)
    endpoint = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )
    return {
        "protocol": chosen,
        "endpoint": _host_and_path(endpoint) if endpoint else "the exporter's default",
        "exporter": module.__name__,
    }


def _host_and_path(url: str) -> str:
    """An endpoint without credentials or query (``OTEL_EXPORTER_OTLP_HEADERS`` is never shown)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))


@dataclass(frozen=True, slots=True)
class TracerSetup:
    """A configured tracer and the provider that flushes it on ``shutdown``."""

    tracer: Tracer
    provider: Any

    def shutdown(self) -> None:
        self.provider.shutdown()


def tracer_from_env(env: Mapping[str, str]) -> TracerSetup | None:
    """The OTLP-exporting tracer the variables configure, or ``None`` (tracing off)."""
    if not is_enabled(env):
        return None
    return tracer_with(_exporter_module(protocol(env)).OTLPSpanExporter())


def _exporter_module(chosen: str) -> Any:
    """The OTLP exporter module of protocol ``chosen``; ``TracingConfigError`` when missing."""
    module_name = _EXPORTERS[chosen]
    try:
        return importlib.import_module(module_name)
    except ImportError:
        raise TracingConfigError(
            f"OTEL_* variables configure OTLP traces but {module_name} is not installed: "
            "pip install 'extproc[otlp]'"
        ) from None


def tracer_with(exporter: Any) -> TracerSetup:
    """A tracer whose spans go to ``exporter`` in batches (tests pass an in-memory one)."""
    from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_KEY
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_KEY, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_KEY: DEFAULT_SERVICE}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return TracerSetup(provider.get_tracer(TRACER_NAME), provider)


def start_stream(tracer: Tracer, carrier: Mapping[str, str]) -> Span:
    """The span of one ext_proc stream, a child of the caller's ``traceparent`` if any."""
    parent = _PROPAGATOR.extract(carrier) if carrier else None
    return tracer.start_span(STREAM_SPAN, context=parent, kind=SpanKind.SERVER)


def task_context(span: Span) -> contextvars.Context:
    """A context for a task whose spans are children of ``span``."""
    ctx = contextvars.copy_context()
    ctx.run(otel_context.attach, trace.set_span_in_context(span))
    return ctx
