"""A buf plugin that runs grpcio-tools' protoc with the gRPC Python generator built into it.

grpcio-tools ships that generator inside its protoc rather than as a ``protoc-gen-*``
program, so buf cannot call it directly. buf hands this script a CodeGeneratorRequest; it
gives protoc the request's files as a descriptor set, asks for ``--grpc_python_out`` for the
files to generate that define a service (the others would get a module of imports only), and
answers with what protoc wrote. The plugin parameter, if any, is passed on to the generator.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc

Response = plugin_pb2.CodeGeneratorResponse


def generate(request: plugin_pb2.CodeGeneratorRequest) -> Response:
    """The gRPC modules of the request's service files, or an error protoc reported."""
    wanted = set(request.file_to_generate)
    names = [fd.name for fd in request.proto_file if fd.name in wanted and fd.service]
    response = Response(supported_features=Response.FEATURE_PROTO3_OPTIONAL)
    if not names:
        return response
    with tempfile.TemporaryDirectory(prefix="extproc-grpc-") as tmp:
        image, out = Path(tmp) / "request.binpb", Path(tmp) / "out"
        image.write_bytes(
            descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString()
        )
        out.mkdir()
        parameter = f"{request.parameter}:" if request.parameter else ""
        args = ["protoc", f"--descriptor_set_in={image}", f"--grpc_python_out={parameter}{out}"]
        if protoc.main([*args, *names]) != 0:
            response.error = f"grpcio-tools' protoc failed for {', '.join(names)}"
            return response
        for path in sorted(out.rglob("*.py")):
            response.file.add(name=path.relative_to(out).as_posix(), content=path.read_text())
    return response


def main() -> int:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main())
