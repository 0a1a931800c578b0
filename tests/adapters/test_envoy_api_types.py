"""The generated Envoy ext_proc messages (extproc/_envoy_api) round-trip through the wire format."""

from extproc._envoy_api.envoy.config.core.v3 import base_pb2
from extproc._envoy_api.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from extproc._envoy_api.envoy.type.v3 import http_status_pb2


def body_continue_with_header() -> ext_proc.ProcessingResponse:
    response = ext_proc.ProcessingResponse()
    response.request_body.SetInParent()
    mutation = response.request_body.response.header_mutation
    mutation.set_headers.append(
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="x-prompt-cache", raw_value=b"miss"),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    )
    mutation.remove_headers.append("content-length")
    response.mode_override.response_body_mode = processing_mode_pb2.ProcessingMode.STREAMED
    return response


def test_body_response_with_header_mutation_round_trips() -> None:
    wire = body_continue_with_header().SerializeToString()
    parsed = ext_proc.ProcessingResponse.FromString(wire)

    assert parsed.WhichOneof("response") == "request_body"
    common = parsed.request_body.response
    assert common.status == ext_proc.CommonResponse.CONTINUE
    [option] = common.header_mutation.set_headers
    assert (option.header.key, option.header.raw_value) == ("x-prompt-cache", b"miss")
    assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert list(common.header_mutation.remove_headers) == ["content-length"]
    assert parsed.mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.STREAMED


def test_immediate_response_status_round_trips() -> None:
    sent = ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.BadRequest),
            body=b'{"error":{}}',
        )
    )
    parsed = ext_proc.ProcessingResponse.FromString(sent.SerializeToString())

    assert parsed.WhichOneof("response") == "immediate_response"
    assert parsed.immediate_response.status.code == 400
    assert parsed.immediate_response.body == b'{"error":{}}'
