"""protos/ is held to the API compiled into the shipped envoy binary (scripts/protos.py --check).

The check compiles the sources and compares descriptors, so it passes on the committed files and
on a comment-only edit, and fails on a changed field, a missing file or an extra one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE = Path("envoy/service/ext_proc/v3/external_processor.proto")


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def renumber(protos: Path) -> None:
    _edit(protos / SERVICE, "bool observability_mode = 10;", "bool observability_mode = 20;")


def comment(protos: Path) -> None:
    _edit(protos / SERVICE, "message HttpBody {", "// A note.\nmessage HttpBody {")


def drop_annotation(protos: Path) -> None:
    (protos / "udpa/annotations/migrate.proto").unlink()


def add_file(protos: Path) -> None:
    (protos / "envoy/extra.proto").write_text('syntax = "proto3";\npackage extra;\n')


CASES = [
    pytest.param(None, 0, "is the API of envoy 1.40.0", id="committed-sources"),
    pytest.param(comment, 0, "is the API of envoy 1.40.0", id="comment-only"),
    pytest.param(renumber, 1, f"differs: {SERVICE.as_posix()}", id="changed-field"),
    pytest.param(drop_annotation, 1, "missing: udpa/annotations/migrate.proto", id="missing"),
    pytest.param(add_file, 1, "extra:   envoy/extra.proto", id="extra"),
]


@pytest.mark.parametrize(("change", "code", "line"), CASES)
def test_check_compares_the_api_with_the_binary(
    tmp_path: Path, change: Callable[[Path], None] | None, code: int, line: str
) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", protos, ignore=shutil.ignore_patterns("*.md"))
    if change is not None:
        change(protos)

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/protos.py"), "--check", "--protos", str(protos)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == code, done.stdout + done.stderr
    assert line in done.stdout + done.stderr
