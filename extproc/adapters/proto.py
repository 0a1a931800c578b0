"""Envoy ext_proc protobuf messages to session events, and session actions to replies.

This is the only module that touches Envoy's ``*_pb2`` types. Every reply sets its ``response``
oneof (an unset oneof is a spurious message to Envoy); constant replies are built and
serialised once, at import, and the server sends replies as bytes.

Mode overrides this server sends. Envoy compares the *effective* tuple (unset header/trailer
fields filled from the filter's ``processing_mode``, body modes taken verbatim, the request
header mode ignored) against ``allowed_override_modes``, so the Envoy config must list exactly:

* non-chat request, in the request-headers reply:
  ``{request_body_mode: NONE, response_header_mode: SKIP, response_body_mode: NONE,
  request_trailer_mode: SKIP, response_trailer_mode: SKIP}``
* JSON response, in the response-headers reply:
  ``{request_body_mode: NONE, response_header_mode: SEND, response_body_mode: BUFFERED,
  request_trailer_mode: SKIP, response_trailer_mode: SKIP}``
* SSE response, in the response-headers reply (with ``content-length`` removed):
  ``{request_body_mode: NONE, response_header_mode: SEND, response_body_mode: STREAMED,
  request_trailer_mode: SKIP, response_trailer_mode: SKIP}``
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import TypeVar

from google.protobuf import duration_pb2

from extproc._envoy_api.envoy.config.core.v3 import base_pb2
from extproc._envoy_api.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.core import defaults
from extproc.core import phases as s
from extproc.core.route import header_attribute

_Mode = processing_mode_pb2.ProcessingMode
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_R = TypeVar("_R", bytes, pb.ProcessingResponse)


class Phase(enum.Enum):
    """Which message Envoy sent; the value is the oneof field name, shared by the reply."""

    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    REQUEST_TRAILERS = "request_trailers"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"
    RESPONSE_TRAILERS = "response_trailers"


class ProtocolError(Exception):
    """Envoy sent a message this server cannot answer (no oneof, observability mode)."""


# ---- requests → events ----


def to_event(request: pb.ProcessingRequest) -> tuple[Phase, s.Event]:
    """The phase of ``request`` and the session event it carries."""
    kind = request.WhichOneof("request")
    if kind is None:
        raise ProtocolError("ProcessingRequest without a message")
    if request.observability_mode:
        raise ProtocolError("observability mode is not supported: replies would be ignored")
    phase = Phase(kind)
    return phase, _DECODERS[phase](request)


def header_map(headers: pb.HttpHeaders) -> dict[str, str]:
    """Header names (lower case) to values; Envoy sends values in ``raw_value``."""
    return {h.key.lower(): _header_value(h) for h in headers.headers.headers}


def _header_value(header: base_pb2.HeaderValue) -> str:
    if header.raw_value:
        return header.raw_value.decode("utf-8", "replace")
    return header.value


def _request_headers(request: pb.ProcessingRequest) -> s.Event:
    msg = request.request_headers
    headers = header_map(msg)
    return s.RequestHeaders(
        path=headers.get(":path", ""),
        method=headers.get(":method", ""),
        headers=headers,
        end_of_stream=msg.end_of_stream,
    )


def _response_headers(request: pb.ProcessingRequest) -> s.Event:
    msg = request.response_headers
    headers = header_map(msg)
    return s.ResponseHeaders(
        status=_status(headers.get(":status", "")),
        content_type=headers.get("content-type", ""),
        end_of_stream=msg.end_of_stream,
    )


def _status(text: str) -> int:
    return int(text) if text.isdigit() else 0


def _request_body(request: pb.ProcessingRequest) -> s.Event:
    msg = request.request_body
    return s.RequestBody(msg.body, msg.end_of_stream, _string_attributes(request))


def _response_body(request: pb.ProcessingRequest) -> s.Event:
    msg = request.response_body
    status = _response_code(request)
    return s.ResponseBody(msg.body, msg.end_of_stream, status)


# Envoy delivers the configured request/response attributes under the filter's name.
FILTER_NAME = defaults.ENVOY_FILTER_NAME
RESPONSE_CODE = "response.code"


def _string_attributes(request: pb.ProcessingRequest) -> dict[str, str] | None:
    """The filter's string attributes (the body-first layout's request facts), if any."""
    if FILTER_NAME not in request.attributes:
        return None
    fields = request.attributes[FILTER_NAME].fields
    return {k: v.string_value for k, v in fields.items() if v.HasField("string_value")}


def _response_code(request: pb.ProcessingRequest) -> int | None:
    """``response.code`` when Envoy sent it with the body (response headers skipped)."""
    if FILTER_NAME not in request.attributes:
        return None
    value = request.attributes[FILTER_NAME].fields.get(RESPONSE_CODE)
    return int(value.number_value) if value is not None and value.HasField("number_value") else None


TRACE_HEADERS = ("traceparent", "tracestate")


def trace_carrier(request: pb.ProcessingRequest) -> dict[str, str]:
    """The W3C trace-context headers of a stream's first message (headers or attributes)."""
    if request.HasField("request_headers"):
        headers = header_map(request.request_headers)
        return {name: headers[name] for name in TRACE_HEADERS if name in headers}
    attributes = _string_attributes(request) or {}
    found = {name: attributes.get(header_attribute(name)) for name in TRACE_HEADERS}
    return {name: value for name, value in found.items() if value}


def _request_trailers(_request: pb.ProcessingRequest) -> s.Event:
    return s.RequestTrailers()


def _response_trailers(_request: pb.ProcessingRequest) -> s.Event:
    return s.ResponseTrailers()


_DECODERS: dict[Phase, Callable[[pb.ProcessingRequest], s.Event]] = {
    Phase.REQUEST_HEADERS: _request_headers,
    Phase.REQUEST_BODY: _request_body,
    Phase.REQUEST_TRAILERS: _request_trailers,
    Phase.RESPONSE_HEADERS: _response_headers,
    Phase.RESPONSE_BODY: _response_body,
    Phase.RESPONSE_TRAILERS: _response_trailers,
}

# ---- actions → replies ----


def to_reply(phase: Phase, action: s.Action) -> bytes:
    """The serialised reply to a message of ``phase``; constant replies are serialised once."""
    if isinstance(action, s.Continue):
        return _CONTINUE[phase]
    if isinstance(action, s.SkipRest):
        return _expect(phase, Phase.REQUEST_HEADERS, _SKIP_REST)
    if isinstance(action, s.WatchResponse):
        return _expect(phase, Phase.RESPONSE_HEADERS, _WATCH[action.mode])
    return _data_reply(phase, action).SerializeToString()


def extend_timeout(seconds: float) -> bytes:
    """A message carrying only ``override_message_timeout``: Envoy waits ``seconds`` more.

    Sent before the real reply when that reply has to wait longer than Envoy's message
    timeout allows (once per direction).
    """
    reply = pb.ProcessingResponse()
    whole = int(seconds)
    reply.override_message_timeout.CopyFrom(
        duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
    )
    return reply.SerializeToString()


_REJECT_PHASES = frozenset({Phase.REQUEST_HEADERS, Phase.REQUEST_BODY})


def _data_reply(
    phase: Phase, action: s.Reject | s.RewritePath | s.ReplaceBody | s.EmitChunk
) -> pb.ProcessingResponse:
    """The reply for an action that carries data; raises ``ProtocolError`` for a mismatch."""
    if isinstance(action, s.Reject):
        if phase not in _REJECT_PHASES:
            raise ProtocolError(f"cannot reject in reply to {phase.value}")
        return immediate(action)
    if isinstance(action, s.RewritePath):
        return _expect(phase, Phase.REQUEST_HEADERS, rewrite_path(action.path))
    if isinstance(action, s.ReplaceBody):
        return replace_body(phase, action.body)
    return emit_chunk(phase, action.data)


def _expect(phase: Phase, wanted: Phase, reply: _R) -> _R:
    if phase is not wanted:
        raise ProtocolError(f"cannot answer {phase.value} with a {wanted.value} reply")
    return reply


def _continue(phase: Phase) -> pb.ProcessingResponse:
    reply = pb.ProcessingResponse()
    getattr(reply, phase.value).SetInParent()
    return reply


def _common(reply: pb.ProcessingResponse, phase: Phase) -> pb.CommonResponse:
    """The ``CommonResponse`` of a headers or body reply (sets the oneof)."""
    part = getattr(reply, phase.value)
    part.SetInParent()
    common: pb.CommonResponse = part.response
    common.SetInParent()
    return common


def set_header(mutation: pb.HeaderMutation, key: str, value: str) -> None:
    option = mutation.set_headers.add()
    option.header.key = key
    option.header.raw_value = value.encode()
    option.append_action = _OVERWRITE


def rewrite_path(path: str) -> pb.ProcessingResponse:
    """Continue the request headers with ``:path`` set to ``path``."""
    reply = pb.ProcessingResponse()
    set_header(_common(reply, Phase.REQUEST_HEADERS).header_mutation, ":path", path)
    return reply


def replace_body(phase: Phase, body: bytes) -> pb.ProcessingResponse:
    """A buffered body replaced whole, with ``content-length`` set to match."""
    if phase not in (Phase.REQUEST_BODY, Phase.RESPONSE_BODY):
        raise ProtocolError(f"cannot replace a body in reply to {phase.value}")
    reply = pb.ProcessingResponse()
    common = _common(reply, phase)
    common.body_mutation.body = body
    set_header(common.header_mutation, "content-length", str(len(body)))
    return reply


def emit_chunk(phase: Phase, data: bytes) -> pb.ProcessingResponse:
    """A streamed chunk replaced by ``data``; empty data clears the chunk (bytes held back)."""
    if phase is not Phase.RESPONSE_BODY:
        raise ProtocolError(f"cannot emit a chunk in reply to {phase.value}")
    reply = pb.ProcessingResponse()
    mutation = _common(reply, phase).body_mutation
    if data:
        mutation.body = data
    else:
        mutation.clear_body = True
    return reply


def immediate(action: s.Reject) -> pb.ProcessingResponse:
    """A local reply to the client (the 400 envelope), as ``application/json``."""
    reply = pb.ProcessingResponse()
    answer = reply.immediate_response
    answer.status.code = action.status  # type: ignore[assignment]
    set_header(answer.headers, "content-type", "application/json")
    answer.body = action.body
    answer.details = action.details
    return reply


def _mode_override(
    header: _Mode.HeaderSendMode.ValueType, body: _Mode.BodySendMode.ValueType
) -> _Mode:
    return _Mode(
        request_body_mode=_Mode.NONE,
        response_header_mode=header,
        response_body_mode=body,
        request_trailer_mode=_Mode.SKIP,
        response_trailer_mode=_Mode.SKIP,
    )


def _skip_rest() -> pb.ProcessingResponse:
    reply = _continue(Phase.REQUEST_HEADERS)
    reply.mode_override.CopyFrom(_mode_override(_Mode.SKIP, _Mode.NONE))
    return reply


def _watch(mode: s.ResponseMode) -> pb.ProcessingResponse:
    reply = pb.ProcessingResponse()
    common = _common(reply, Phase.RESPONSE_HEADERS)
    if mode is s.ResponseMode.STREAMED:
        common.header_mutation.remove_headers.append("content-length")
        reply.mode_override.CopyFrom(_mode_override(_Mode.SEND, _Mode.STREAMED))
    else:
        reply.mode_override.CopyFrom(_mode_override(_Mode.SEND, _Mode.BUFFERED))
    return reply


def with_metadata(reply: bytes, namespace: str, fields: Mapping[str, str | int | None]) -> bytes:
    """``reply`` that also sets Envoy dynamic metadata ``namespace`` to ``fields``.

    Serialised protobuf messages merge when concatenated: the reply's bytes stay as they are,
    followed by a message that sets only ``dynamic_metadata``.
    """
    extra = pb.ProcessingResponse()
    extra.dynamic_metadata.fields[namespace].struct_value.update(fields)
    return reply + extra.SerializeToString()


_CONTINUE = {phase: _continue(phase).SerializeToString() for phase in Phase}
_SKIP_REST = _skip_rest().SerializeToString()
_WATCH = {mode: _watch(mode).SerializeToString() for mode in s.ResponseMode}
