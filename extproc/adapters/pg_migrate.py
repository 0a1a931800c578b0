"""The schema migration runner: plain SQL files applied in order, each in its own transaction.

Rules:
* a migration file is named ``NNNN_name.sql``; its version is the number, its checksum the
  SHA-256 of its bytes;
* applied files are recorded in ``extproc_schema_migrations``; running again is a no-op;
* a database that records a version this code does not ship is *ahead of the code*: refuse;
* an applied file whose checksum changed is refused too (history must not be rewritten);
* one runner at a time per database (a session advisory lock held for the whole run).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.rows import TupleRow

from extproc.core.errors import ExtprocError

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"

# An arbitrary constant naming "the extproc migration runner" among advisory locks.
_LOCK_KEY = 0x65787470726F63

_FILE_NAME = re.compile(r"^(\d{4,})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = b"""
CREATE TABLE IF NOT EXISTS extproc_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(ExtprocError):
    """The database schema and the shipped migrations disagree; nothing was applied."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file shipped with the code."""

    version: int
    name: str
    sql: bytes

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    """A row of ``extproc_schema_migrations``."""

    version: int
    name: str
    checksum: str


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What one run did: the migrations it applied and the ones already there."""

    applied: tuple[Migration, ...]
    already: int


def load_migrations(directory: Path = MIGRATIONS_DIR) -> tuple[Migration, ...]:
    """Every migration file of ``directory``, in version order."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migration files have version {version}")
        found[version] = Migration(version, match.group(2), path.read_bytes())
    return tuple(found[v] for v in sorted(found))


def check_history(known: tuple[Migration, ...], applied: list[AppliedMigration]) -> None:
    """Raise ``MigrationError`` when the database is ahead of the code or history changed."""
    by_version = {m.version: m for m in known}
    latest = max(by_version, default=0)
    for row in applied:
        migration = by_version.get(row.version)
        if migration is None:
            raise MigrationError(
                f"the database has schema migration {row.version:04d}_{row.name}, which this "
                f"extproc does not know (it ships up to {latest:04d}): upgrade extproc first"
            )
        if migration.checksum != row.checksum:
            raise MigrationError(
                f"migration {migration.label}.sql differs from the one applied to the database "
                "(checksum mismatch): applied migrations must never be edited"
            )


def migrate(conninfo: str, directory: Path = MIGRATIONS_DIR) -> MigrationReport:
    """Apply the pending migrations of ``directory`` to the database at ``conninfo``."""
    known = load_migrations(directory)
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        # A migration waiting for a table lock must not stall live traffic queued behind it.
        conn.execute(b"SET lock_timeout = '10s'")
        return _migrate_locked(conn, known)  # closing the session releases the advisory lock


def _migrate_locked(
    conn: psycopg.Connection[TupleRow], known: tuple[Migration, ...]
) -> MigrationReport:
    conn.execute(_CREATE_TABLE)
    applied = read_applied(conn)
    check_history(known, applied)
    done = {row.version for row in applied}
    pending = tuple(m for m in known if m.version not in done)
    for migration in pending:
        _apply(conn, migration)
    return MigrationReport(pending, len(done))


def read_applied(conn: psycopg.Connection[TupleRow]) -> list[AppliedMigration]:
    """The recorded migrations, in version order."""
    rows = conn.execute(
        "SELECT version, name, checksum FROM extproc_schema_migrations ORDER BY version"
    ).fetchall()
    return [AppliedMigration(*row) for row in rows]


def _apply(conn: psycopg.Connection[TupleRow], migration: Migration) -> None:
    try:
        _apply_in_transaction(conn, migration)
    except psycopg.DatabaseError as exc:
        detail = " ".join(str(exc).split())
        raise MigrationError(f"migration {migration.label}.sql failed: {detail}") from exc


def _apply_in_transaction(conn: psycopg.Connection[TupleRow], migration: Migration) -> None:
    with conn.transaction():
        conn.execute(migration.sql)
        conn.execute(
            "INSERT INTO extproc_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
            (migration.version, migration.name, migration.checksum),
        )
