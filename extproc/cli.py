"""The ``extproc`` command line: one sub-command module per job, registered here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from extproc.core.errors import ExtprocError

# Each module defines ``register(subparsers)`` adding its sub-commands; a sub-command sets
# ``func(args) -> int`` as its default. Imported lazily so ``extproc explain`` stays light.
COMMAND_MODULES = (
    "extproc.commands.explain",
    "extproc.commands.health",
    "extproc.commands.demo_upstream",
    "extproc.commands.dev",
    "extproc.commands.migrate",
    "extproc.commands.admin",
    "extproc.commands.report",
    "extproc.commands.serve",
    "extproc.commands.tokenizer",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extproc",
        description="Prompt-cache accounting sidecar for Envoy ext_proc.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ExtprocError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
