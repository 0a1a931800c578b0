"""Regenerate, or check, the Envoy API stubs in typings/ from the descriptors xds-protos embeds.

The Envoy API modules in xds-protos carry their serialized FileDescriptorProtos. This script
collects those the project uses, with everything they import, into a FileDescriptorSet image
and hands it to `buf generate` with the repository's buf.gen.yaml, then drops the empty service
stubs written for files that define no service. No network is needed.

    python scripts/gen_stubs.py           # rewrite typings/
    python scripts/gen_stubs.py --check   # fail when typings/ differs from a fresh generation
"""

from __future__ import annotations

import argparse
import filecmp
import importlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "buf.gen.yaml"
IMAGE = ROOT / "build" / "envoy-api.binpb"
STUBS = "typings"

# The generated modules the project imports; their imports are followed transitively.
MODULES = (
    "envoy.service.ext_proc.v3.external_processor_pb2",
    "envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2",
    "envoy.config.core.v3.base_pb2",
    "envoy.type.v3.http_status_pb2",
)

# In the image (buf needs complete imports) but not generated: types-protobuf covers them.
EXCLUDED = ("google/protobuf",)


def root_files(modules: Iterable[str]) -> list[FileDescriptor]:
    """The file descriptors of the named generated modules."""
    return [importlib.import_module(name).DESCRIPTOR for name in modules]


def closure(roots: Iterable[FileDescriptor]) -> Iterator[FileDescriptor]:
    """Every file the roots need, each once, imports before their importers."""
    seen: set[str] = set()

    def visit(fd: FileDescriptor) -> Iterator[FileDescriptor]:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in sorted(fd.dependencies, key=lambda d: d.name):
            yield from visit(dep)
        yield fd

    for fd in sorted(roots, key=lambda f: f.name):
        yield from visit(fd)


def build_image(modules: Iterable[str]) -> descriptor_pb2.FileDescriptorSet:
    """A FileDescriptorSet of the modules' files and their imports, in a fixed order."""
    image = descriptor_pb2.FileDescriptorSet()
    for fd in closure(root_files(modules)):
        image.file.append(descriptor_pb2.FileDescriptorProto.FromString(fd.serialized_pb))
    return image


def serviceless_grpc_stubs(image: descriptor_pb2.FileDescriptorSet) -> list[str]:
    """Service stubs the grpc plugin writes for files without services (no such module exists)."""
    return [
        f"{STUBS}/{proto.name.removesuffix('.proto')}_pb2_grpc.pyi"
        for proto in image.file
        if not proto.service and not proto.name.startswith(EXCLUDED)
    ]


def buf_command(image: Path, out_base: Path) -> list[str]:
    """The `buf generate` call writing the template's outputs under out_base."""
    buf = Path(sys.executable).parent / "buf"
    excludes = [arg for path in EXCLUDED for arg in ("--exclude-path", path)]
    return [
        str(buf),
        "generate",
        str(image),
        "--template",
        str(TEMPLATE),
        "--output",
        str(out_base),
        *excludes,
    ]


def generate(image: Path, out_base: Path) -> None:
    """Write the image, run buf with the venv's plugins first on PATH, drop empty grpc stubs."""
    descriptors = build_image(MODULES)
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(descriptors.SerializeToString(deterministic=True))
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    subprocess.run(buf_command(image, out_base), cwd=ROOT, env=env, check=True)
    for name in serviceless_grpc_stubs(descriptors):
        (out_base / name).unlink()


def tree(base: Path) -> dict[str, Path]:
    """Files under base by their relative path."""
    if not base.is_dir():
        return {}
    return {p.relative_to(base).as_posix(): p for p in base.rglob("*") if p.is_file()}


def differences(committed: Path, fresh: Path) -> list[str]:
    """One line per file that is missing, extra or changed in committed relative to fresh."""
    old, new = tree(committed), tree(fresh)
    lines = [f"missing: {STUBS}/{name}" for name in sorted(new.keys() - old.keys())]
    lines += [f"extra:   {STUBS}/{name}" for name in sorted(old.keys() - new.keys())]
    lines += [
        f"changed: {STUBS}/{name}"
        for name in sorted(old.keys() & new.keys())
        if not filecmp.cmp(old[name], new[name], shallow=False)
    ]
    return lines


def check() -> int:
    """Regenerate into a temporary directory and compare with the committed stubs."""
    with tempfile.TemporaryDirectory(prefix="extproc-stubs-") as tmp:
        base = Path(tmp)
        generate(base / "envoy-api.binpb", base)
        stale = differences(ROOT / STUBS, base / STUBS)
    if stale:
        print(f"{STUBS}/ is stale; run `python scripts/gen_stubs.py` and commit:", file=sys.stderr)
        for line in stale:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"{STUBS}/ is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help=f"fail if {STUBS}/ differs from a fresh generation"
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    generate(IMAGE, ROOT)
    print(f"wrote {STUBS}/ from {IMAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
