"""The fuzz targets: the checked-in corpus holds every invariant, and a short seeded
coverage-guided run (atheris) finds no violation. The README (Fuzzing) has the long run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.core import dialects
from tests.fuzz.targets import DIALECTS, TARGETS

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
# A target's corpus folder and dictionary: request:chat -> corpus/request-chat, request-chat.dict.
FOLDERS = {name: name.replace(":", "-") for name in TARGETS}
DICTIONARIES = {name: HERE / f"{FOLDERS[name]}.dict" for name in TARGETS}
# Short enough for the test command (a few seconds each), long enough to leave the corpus.
RUNS = 6000
REQUEST_OPTIONS = [b""] + [bytes([0x10 + i]) for i in range(16)]
STREAM_OPTIONS = [b""] + [bytes([0x10 + i, size]) for i in range(16) for size in (0, 1, 9, 64)]


def test_every_target_has_a_corpus_and_a_dictionary() -> None:
    assert set(TARGETS) == {f"request:{name}" for name in DIALECTS} | {"sse"}
    for name in TARGETS:
        assert sorted((CORPUS / FOLDERS[name]).iterdir()), name
        assert DICTIONARIES[name].is_file(), name


@pytest.mark.parametrize("name", sorted(DIALECTS))
def test_every_dialect_target_is_its_routes(name: str) -> None:
    served = dialects.for_request("POST", DIALECTS[name].route)
    assert served is not None
    assert served.name == name


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_corpus_holds_every_invariant(name: str) -> None:
    options = STREAM_OPTIONS if name == "sse" else REQUEST_OPTIONS
    for path in sorted((CORPUS / FOLDERS[name]).iterdir()):
        data = path.read_bytes()
        for prefix in options:
            TARGETS[name](prefix + data)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_a_short_fuzz_run_finds_nothing(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    found = tmp_path / "found"
    found.mkdir()
    argv = [sys.executable, "-m", "tests.fuzz.run", name, f"-runs={RUNS}", "-seed=1"]
    argv += ["-max_len=4096", f"-dict={DICTIONARIES[name]}", f"-artifact_prefix={tmp_path}/"]
    argv += [str(found), str(CORPUS / FOLDERS[name])]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=600, check=False, cwd=HERE.parent.parent
    )
    assert done.returncode == 0, done.stderr[-6000:]
    runs = re.search(r"Done (\d+) runs in (\d+) second", done.stderr)
    assert runs is not None, done.stderr[-3000:]
    with capsys.disabled():
        print(f"\nfuzz {name}: {runs.group(1)} inputs run in {runs.group(2)} s, no violation")
    assert int(runs.group(1)) >= RUNS
