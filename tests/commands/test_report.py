"""``extproc report`` against a real database: live entries per principal and model."""

from __future__ import annotations

import datetime

import psycopg
import pytest

from tests.commands.test_admin import run, run_json, use_database

# Live entries expire days from now, long after any test ends; expired ones a day ago.
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@pytest.fixture
def db(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    use_database(monkeypatch, database_url)
    rows = [
        ("tenant-a", "m1", "5m", 100, NOW + datetime.timedelta(days=4)),
        ("tenant-a", "m1", "5m", 250, NOW + datetime.timedelta(days=3)),
        ("tenant-a", "m1", "1h", 40, NOW + datetime.timedelta(days=50)),
        ("tenant-a", "m1", "24h", 7, NOW + datetime.timedelta(days=20)),
        ("tenant-a", "m1", "5m", 999, NOW - datetime.timedelta(days=1)),  # expired
        ("tenant-a", "m2", "1h", 30, NOW + datetime.timedelta(days=30)),
        ("tenant-b", "m1", "5m", 12, NOW + datetime.timedelta(days=2)),
        ("tenant-c", "m1", "1h", 5, NOW - datetime.timedelta(days=2)),  # nothing live
    ]
    with psycopg.connect(database_url, autocommit=True) as conn:
        for i, (principal, model, tier, tokens, expires) in enumerate(rows):
            conn.execute(
                "INSERT INTO prompt_cache_entries (principal_id, virtual_model,"
                " tokenizer_version, prefix_hash, cumulative_token_count, ttl_tier, expires_at)"
                " VALUES (%s, %s, 'v', sha256(%s::bytea), %s, %s, %s)",
                (principal, model, str(i).encode(), tokens, tier, expires),
            )
    return database_url


def _at(delta: datetime.timedelta) -> str:
    return (NOW + delta).isoformat(timespec="seconds")


def test_json_per_principal_and_model(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_json(capsys, "report") == [
        {
            "principal": "tenant-a",
            "model": "m1",
            "live_entries": 4,
            "tokens_5m": 350,
            "tokens_1h": 40,
            "tokens_24h": 7,
            "oldest_expiry": _at(datetime.timedelta(days=3)),
        },
        {
            "principal": "tenant-a",
            "model": "m2",
            "live_entries": 1,
            "tokens_5m": 0,
            "tokens_1h": 30,
            "tokens_24h": 0,
            "oldest_expiry": _at(datetime.timedelta(days=30)),
        },
        {
            "principal": "tenant-b",
            "model": "m1",
            "live_entries": 1,
            "tokens_5m": 12,
            "tokens_1h": 0,
            "tokens_24h": 0,
            "oldest_expiry": _at(datetime.timedelta(days=2)),
        },
    ]


def test_filters(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    only = run_json(capsys, "report", "--principal", "tenant-a", "--model", "m2")
    assert [(r["principal"], r["model"]) for r in only] == [("tenant-a", "m2")]
    assert run_json(capsys, "report", "--principal", "tenant-c") == []


def test_table(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", "--model", "m1")
    lines = out.splitlines()

    assert code == 0
    assert lines[0].split() == [
        "principal",
        "model",
        "live_entries",
        "tokens_5m",
        "tokens_1h",
        "tokens_24h",
        "oldest_expiry",
    ]
    assert [line.split()[:6] for line in lines[1:]] == [
        ["tenant-a", "m1", "4", "350", "40", "7"],
        ["tenant-b", "m1", "1", "12", "0", "0"],
    ]
