"""The ``migrate`` sub-command: apply pending schema migrations to the database."""

from __future__ import annotations

import argparse
import os

from extproc.adapters.pg_migrate import migrate
from extproc.commands.database import database_command, database_conninfo


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("migrate", help="apply pending database schema migrations")
    parser.set_defaults(func=run_migrate)


@database_command
def run_migrate(args: argparse.Namespace) -> int:
    report = migrate(database_conninfo(os.environ))
    for migration in report.applied:
        print(f"applied {migration.label}")
    total = report.already + len(report.applied)
    print(f"database schema is up to date ({total} migrations)")
    return 0
