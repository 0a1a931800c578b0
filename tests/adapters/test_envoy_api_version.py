"""The generated Envoy API is Envoy 1.40's, and it lives only inside extproc."""

from __future__ import annotations

import subprocess
import sys

import pytest
from google.protobuf.message import Message

from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.adapters import servicer

# Fields of the ext_proc service API that the 1.40 binary has (and older APIs lack).
FIELDS_1_40 = [
    pytest.param(pb.ProcessingResponse, "typed_dynamic_metadata", 13, id="typed_dynamic_metadata"),
    pytest.param(pb.ProcessingResponse, "streamed_immediate_response", 11, id="streamed_immediate"),
    pytest.param(pb.ProcessingResponse, "request_drain_requests", 15, id="drain_requests"),
    pytest.param(pb.ProcessingResponse, "request_drain_responses", 16, id="drain_responses"),
    pytest.param(pb.ProcessingResponse, "server_window_update", 14, id="server_window_update"),
    pytest.param(pb.ProcessingRequest, "flow_control_init", 12, id="flow_control_init"),
    pytest.param(pb.HttpBody, "drain_complete", 5, id="body_drain_complete"),
]


@pytest.mark.parametrize(("message", "name", "number"), FIELDS_1_40)
def test_api_has_the_1_40_fields(message: type[Message], name: str, number: int) -> None:
    assert message.DESCRIPTOR.fields_by_name[name].number == number


def test_servicer_serves_the_generated_service() -> None:
    service = pb.DESCRIPTOR.services_by_name["ExternalProcessor"]

    assert service.full_name == servicer.SERVICE
    assert [method.name for method in service.methods] == ["Process"]


def test_generated_modules_import_no_top_level_api_package() -> None:
    """Importing the server loads no ``envoy``, ``udpa``, ``validate`` or ``xds`` package."""
    program = (
        "import sys\n"
        "import extproc.adapters.servicer\n"
        "from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2_grpc\n"
        "roots = {'envoy', 'udpa', 'validate', 'xds'}\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in roots))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    )

    assert done.stdout.strip() == "[]"
