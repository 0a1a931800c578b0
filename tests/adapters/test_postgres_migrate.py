"""The migration runner against a real PostgreSQL."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from extproc.adapters.pg_migrate import MIGRATIONS_DIR, MigrationError, load_migrations, migrate


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {row[0] for row in rows}


def recorded(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version FROM extproc_schema_migrations ORDER BY 1").fetchall()
    return [row[0] for row in rows]


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    """A private copy of the shipped migrations that a test may extend or edit."""
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    return directory


def test_shipped_migrations_are_numbered_from_one() -> None:
    versions = [m.version for m in load_migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_migrate_applies_everything_once(empty_database_url: str) -> None:
    first = migrate(empty_database_url)
    second = migrate(empty_database_url)
    assert [m.version for m in first.applied] == [1, 2, 3]
    assert (second.applied, second.already) == ((), 3)
    assert {"prompt_cache_entries", "model_cache_tariffs", "api_keys"} <= tables(empty_database_url)


def test_concurrent_runs_apply_each_migration_once(empty_database_url: str) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        reports = list(pool.map(lambda _: migrate(empty_database_url), range(3)))
    assert sorted(len(r.applied) for r in reports) == [0, 0, 3]
    assert recorded(empty_database_url) == [1, 2, 3]


def test_database_ahead_of_code_is_refused(empty_database_url: str, migrations: Path) -> None:
    (migrations / "0099_from_the_future.sql").write_text("CREATE TABLE future (id int);\n")
    migrate(empty_database_url, migrations)
    with pytest.raises(MigrationError, match=r"0099_from_the_future.*upgrade extproc"):
        migrate(empty_database_url)


def test_edited_applied_migration_is_refused(empty_database_url: str, migrations: Path) -> None:
    migrate(empty_database_url, migrations)
    first = migrations / "0001_prompt_cache_entries.sql"
    first.write_text(first.read_text() + "-- edited\n")
    with pytest.raises(MigrationError, match=r"0001_prompt_cache_entries\.sql.*checksum"):
        migrate(empty_database_url, migrations)


def test_failing_migration_is_rolled_back(empty_database_url: str, migrations: Path) -> None:
    (migrations / "0004_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT * FROM no_such_table;\n"
    )
    with pytest.raises(MigrationError, match=r"0004_broken\.sql failed"):
        migrate(empty_database_url, migrations)
    assert recorded(empty_database_url) == [1, 2, 3]
    assert "half_done" not in tables(empty_database_url)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("1_short.sql", id="short-number"),
        pytest.param("0005-dash.sql", id="dash"),
        pytest.param("0005_Upper.sql", id="upper-case"),
    ],
)
def test_misnamed_migration_file_is_refused(migrations: Path, name: str) -> None:
    (migrations / name).write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match="NNNN_name"):
        load_migrations(migrations)
