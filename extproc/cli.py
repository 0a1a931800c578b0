"""The ``extproc`` command line: one sub-command module per job, registered here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from extproc.core.errors import ExtprocError

# Each module defines ``register(subparsers)`` adding its sub-commands; a sub-command sets
# ``func(args) -> int`` as its default. A run imports only the module of its command, so
# ``extproc serve`` never loads the local-stack tools (nor aiohttp, httpx or PyYAML);
# ``--help`` imports them all. ``DEV_COMMANDS`` need the dev extra.
COMMANDS = {
    "explain": "extproc.commands.explain",
    "health": "extproc.commands.health",
    "demo-upstream": "extproc.commands.demo_upstream",
    "dev": "extproc.commands.dev",
    "migrate": "extproc.commands.migrate",
    "models": "extproc.commands.admin",
    "keys": "extproc.commands.admin",
    "cache": "extproc.commands.admin",
    "report": "extproc.commands.report",
    "serve": "extproc.commands.serve",
    "tokenizer": "extproc.commands.tokenizer",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))
DEV_COMMANDS = frozenset({"dev", "demo-upstream"})


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: its command's module only, or every module (help, errors)."""
    parser = argparse.ArgumentParser(
        prog="extproc",
        description="Prompt-cache accounting sidecar for Envoy ext_proc.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(sys.argv[1:] if argv is None else argv)
    names = [chosen] if chosen is not None else list(COMMANDS)
    for module in dict.fromkeys(COMMANDS[name] for name in names):
        _register(sub, module)
    return parser


def _chosen(argv: Sequence[str]) -> str | None:
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def _register(sub: argparse._SubParsersAction[argparse.ArgumentParser], module: str) -> None:
    try:
        importlib.import_module(module).register(sub)
    except ModuleNotFoundError as exc:  # a dev command without the dev extra
        names = [name for name, owner in COMMANDS.items() if owner == module]
        if not DEV_COMMANDS.issuperset(names):
            raise
        for name in names:
            parser = sub.add_parser(name, help=f"(needs the dev extra: {exc.name} is missing)")
            parser.set_defaults(func=_needs_dev(exc.name or "a dev dependency"))


def _needs_dev(missing: str) -> Callable[[argparse.Namespace], int]:
    def refuse(_args: argparse.Namespace) -> int:
        print(
            f"extproc: this command needs the dev extra ({missing} is missing): "
            "pip install 'extproc[dev]'",
            file=sys.stderr,
        )
        return 2

    return refuse


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
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
