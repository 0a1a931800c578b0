"""``extproc serve``: run the ext_proc gRPC server with settings from the environment."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from extproc.config import ConfigError, Settings

EXIT_CONFIG = 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the ext_proc gRPC server (settings from EXTPROC_* variables)",
        description="Run the Envoy ext_proc server. Settings come from EXTPROC_* environment "
        "variables and an optional TOML file (--config or EXTPROC_CONFIG_FILE; the environment "
        "wins). Invalid settings are all listed and the command exits 2. SIGTERM or SIGINT "
        "stops it gracefully.",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(os.environ, args.config)
    except ConfigError as err:
        print(f"extproc serve: {err}", file=sys.stderr)
        return EXIT_CONFIG
    from extproc import app

    app.main(settings)
    return 0
