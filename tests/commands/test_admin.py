"""The database administration commands, end to end through ``extproc.cli.main``."""

from __future__ import annotations

import hashlib
import io
import socket
from typing import Any

import psycopg
import pytest

from extproc.cli import main
from extproc.core import codec

PG_VARS = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


def use_database(monkeypatch: pytest.MonkeyPatch, url: str | None) -> None:
    for name in PG_VARS:
        monkeypatch.delenv(name, raising=False)
    if url is None:
        monkeypatch.delenv("EXTPROC_DATABASE_URL", raising=False)
    else:
        monkeypatch.setenv("EXTPROC_DATABASE_URL", url)


@pytest.fixture
def db(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    use_database(monkeypatch, database_url)
    return database_url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    return codec.loads(out)


def test_without_a_database_url_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_database(monkeypatch, None)
    code, out, err = run(capsys, "models", "list")
    assert (code, out) == (1, "")
    assert err.startswith("extproc: set EXTPROC_DATABASE_URL")
    assert err.count("\n") == 1


def test_unreachable_database_is_one_readable_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    use_database(monkeypatch, f"postgresql://nobody@127.0.0.1:{port}/none")
    code, _, err = run(capsys, "migrate")
    assert code == 1
    assert err.startswith("extproc: database error:")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_migrate_twice_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], empty_database_url: str
) -> None:
    use_database(monkeypatch, empty_database_url)
    code, out, _ = run(capsys, "migrate")
    assert code == 0
    assert out.splitlines()[0] == "applied 0001_prompt_cache_entries"
    assert run(capsys, "migrate") == (0, "database schema is up to date (3 migrations)\n", "")


def test_models_enable_replace_list_and_disable(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "models", "enable", "m", "--min-prefix-tokens", "1024")[0] == 0
    [row] = run_json(capsys, "models", "list")
    assert (row["model"], row["min_prefix_tokens"]) == ("m", 1024)
    assert (row["write_5m"], row["write_1h"], row["read"]) == ("1.25", "2", "0.1")
    run(capsys, "models", "enable", "m", "--min-prefix-tokens", "2048", "--read", "0.2")
    [row] = run_json(capsys, "models", "list")
    assert (row["min_prefix_tokens"], row["read"]) == (2048, "0.2")
    assert len(run_json(capsys, "models", "list", "--all")) == 2
    assert run(capsys, "models", "disable", "m")[1] == "m: cache-disabled\n"
    assert run_json(capsys, "models", "list") == []
    assert run(capsys, "models", "disable", "m")[1] == "m: was not cache-enabled\n"


def test_models_list_table_has_a_header(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "models", "enable", "qwen", "--min-prefix-tokens", "0")
    lines = run(capsys, "models", "list")[1].splitlines()
    assert lines[0].split()[:2] == ["model", "min_prefix_tokens"]
    assert lines[1].split()[:2] == ["qwen", "0"]


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--min-prefix-tokens", "-1"], id="negative-floor"),
        pytest.param(["--min-prefix-tokens", "5", "--read", "cheap"], id="not-a-number"),
        pytest.param(["--min-prefix-tokens", "5", "--write-1h", "-2"], id="negative-multiplier"),
    ],
)
def test_models_enable_rejects_bad_arguments(db: str, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "enable", "m", *argv])
    assert exit_info.value.code == 2


def add_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], secret: str, who: str
) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(secret + "\n"))
    return run(capsys, "keys", "add", "--principal", who)


def test_keys_add_list_and_revoke_never_show_the_secret(
    db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "sk-very-secret-value"
    key_id = hashlib.sha256(secret.encode()).hexdigest()[:12]
    code, out, _ = add_key(monkeypatch, capsys, secret, "tenant-a")
    assert (code, out) == (0, f"added key {key_id} for principal tenant-a\n")
    listing = run(capsys, "keys", "list")[1]
    assert key_id in listing
    assert secret not in listing
    assert run(capsys, "keys", "revoke", key_id[:8])[1] == f"revoked key {key_id}\n"
    [row] = run_json(capsys, "keys", "list")
    assert (row["key_id"], row["principal"]) == (key_id, "tenant-a")
    assert row["revoked_at"]
    with psycopg.connect(db) as conn:
        stored = conn.execute("SELECT key_hash FROM api_keys").fetchall()
    assert stored == [(hashlib.sha256(secret.encode()).digest(),)]


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        pytest.param("", "no key given", id="empty-secret"),
        pytest.param("sk-dup", "already registered", id="duplicate"),
    ],
)
def test_keys_add_refusals(
    db: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    secret: str,
    message: str,
) -> None:
    add_key(monkeypatch, capsys, "sk-dup", "tenant-a")
    code, _, err = add_key(monkeypatch, capsys, secret, "tenant-b")
    assert code == 1
    assert message in err


@pytest.mark.parametrize(
    ("key_id", "message"),
    [
        pytest.param("abc", "at least 6 hex digits", id="too-short"),
        pytest.param("zzzzzzzz", "at least 6 hex digits", id="not-hex"),
        pytest.param("000000000000", "no key match", id="unknown"),
    ],
)
def test_keys_revoke_refusals(
    db: str, capsys: pytest.CaptureFixture[str], key_id: str, message: str
) -> None:
    code, _, err = run(capsys, "keys", "revoke", key_id)
    assert code == 1
    assert message in err


def insert_entries(url: str, principal: str, model: str, tier: str, live: int, dead: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO prompt_cache_entries (principal_id, virtual_model, tokenizer_version,"
            " prefix_hash, cumulative_token_count, ttl_tier, expires_at)"
            " SELECT %s, %s, 'v', sha256((%s || i)::bytea), i, %s,"
            " now() + CASE WHEN i <= %s THEN interval '1 hour' ELSE interval '-1 hour' END"
            " FROM generate_series(1, %s) AS i",
            (principal, model, principal + model + tier, tier, live, live + dead),
        )


def test_cache_stats_and_purge(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    insert_entries(db, "a", "m1", "5m", live=3, dead=2)
    insert_entries(db, "a", "m1", "1h", live=1, dead=0)
    insert_entries(db, "a", "m2", "5m", live=2, dead=0)
    insert_entries(db, "b", "m1", "5m", live=4, dead=0)
    stats = run_json(capsys, "cache", "stats")
    assert stats == [
        {"model": "m1", "tier": "5m", "entries": 9, "live": 7},
        {"model": "m1", "tier": "1h", "entries": 1, "live": 1},
        {"model": "m2", "tier": "5m", "entries": 2, "live": 2},
    ]
    assert run(capsys, "cache", "purge", "--principal", "a", "--model", "m1")[1] == (
        "purged 6 entries\n"
    )
    assert run(capsys, "cache", "purge", "--principal", "a")[1] == "purged 2 entries\n"
    assert run_json(capsys, "cache", "stats") == [
        {"model": "m1", "tier": "5m", "entries": 4, "live": 4}
    ]
