"""Coverage-guided fuzzing of one target with atheris (libFuzzer), instrumenting ``extproc``.

    python -m tests.fuzz.run TARGET [libFuzzer options] [corpus directories]

TARGET is one of ``tests.fuzz.targets.TARGETS`` (``request:chat``, ``request:messages``,
``request:responses``, ``sse``); its checked-in corpus is ``corpus/request-chat`` (``:``
becomes ``-``) and its dictionary ``request-chat.dict``. A violated invariant or an
unexpected exception stops the run with the input saved (``-artifact_prefix``). libFuzzer's
last line ``Done N runs in S second(s)`` says how many inputs were run.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["extproc"]):
    from tests.fuzz.targets import TARGETS


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.run {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
