"""Database administration: the ``models``, ``keys`` and ``cache`` sub-commands.

They talk to PostgreSQL directly (``EXTPROC_DATABASE_URL``, or libpq's ``PG*`` variables) and
report any database problem as one readable line.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import sys
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from extproc.commands.database import AdminError, connect, database_command
from extproc.core import codec

# Multipliers of the base input price when `models enable` is not told otherwise: Anthropic's
# published 1.25x (5 minutes), 2x (1 hour) and 0.1x (read); there is no published 24-hour
# tier, so 24h extrapolates to 3x.
DEFAULT_MULTIPLIERS = {"write_5m": "1.25", "write_1h": "2", "write_24h": "3", "read": "0.1"}

_MIN_KEY_PREFIX = 6


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_models(sub)
    _register_keys(sub)
    _register_cache(sub)


def _actions(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str
) -> Any:
    parser = sub.add_parser(name, help=summary)
    return parser.add_subparsers(dest=f"{name}_action", required=True, metavar="ACTION")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _multiplier(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative number")
    return value


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


# --- models -------------------------------------------------------------------------------


def _register_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = _actions(sub, "models", "cache-enable models and manage their tariffs")
    enable = actions.add_parser("enable", help="open a new tariff for a model (replaces any)")
    enable.add_argument("alias", help="the model name clients send")
    enable.add_argument("--min-prefix-tokens", type=_non_negative_int, required=True)
    for flag, default in DEFAULT_MULTIPLIERS.items():
        enable.add_argument(
            f"--{flag.replace('_', '-')}", type=_multiplier, default=Decimal(default)
        )
    enable.set_defaults(func=models_enable)
    disable = actions.add_parser("disable", help="close a model's tariff: no more caching")
    disable.add_argument("alias")
    disable.set_defaults(func=models_disable)
    listing = actions.add_parser("list", help="show the active tariffs")
    listing.add_argument("--all", action="store_true", help="include closed tariffs")
    _add_json(listing)
    listing.set_defaults(func=models_list)


_CLOSE_TARIFF = (
    "UPDATE model_cache_tariffs SET valid_until = now()"
    " WHERE model_alias = %s AND valid_until IS NULL"
)


@database_command
def models_enable(args: argparse.Namespace) -> int:
    multipliers = (args.write_5m, args.write_1h, args.write_24h, args.read)
    with connect() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (args.alias,))
        conn.execute(_CLOSE_TARIFF, (args.alias,))
        conn.execute(
            "INSERT INTO model_cache_tariffs (model_alias, write_multiplier_5m,"
            " write_multiplier_1h, write_multiplier_24h, read_multiplier, min_prefix_tokens)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (args.alias, *multipliers, args.min_prefix_tokens),
        )
    print(f"{args.alias}: cache-enabled, min_prefix_tokens={args.min_prefix_tokens}")
    return 0


@database_command
def models_disable(args: argparse.Namespace) -> int:
    with connect() as conn:
        closed = conn.execute(_CLOSE_TARIFF, (args.alias,)).rowcount
    print(f"{args.alias}: " + ("cache-disabled" if closed else "was not cache-enabled"))
    return 0


_TARIFF_COLUMNS = (
    "model",
    "min_prefix_tokens",
    "write_5m",
    "write_1h",
    "write_24h",
    "read",
    "valid_from",
    "valid_until",
)


@database_command
def models_list(args: argparse.Namespace) -> int:
    where = "" if args.all else "WHERE valid_until IS NULL"
    query = (
        "SELECT model_alias, min_prefix_tokens, write_multiplier_5m, write_multiplier_1h,"
        " write_multiplier_24h, read_multiplier, valid_from, valid_until"
        f" FROM model_cache_tariffs {where} ORDER BY model_alias, valid_from"
    )
    with connect() as conn:
        rows = conn.execute(query.encode()).fetchall()
    show(_TARIFF_COLUMNS, rows, as_json=args.json)
    return 0


# --- keys ---------------------------------------------------------------------------------


def _register_keys(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = _actions(sub, "keys", "API keys mapped to principals (stored as hashes)")
    add = actions.add_parser("add", help="register a key read from stdin for a principal")
    add.add_argument("--principal", required=True)
    add.set_defaults(func=keys_add)
    revoke = actions.add_parser("revoke", help="revoke a key by its id (or a unique prefix)")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=keys_revoke)
    listing = actions.add_parser("list", help="show keys (ids and principals, never secrets)")
    _add_json(listing)
    listing.set_defaults(func=keys_list)


def key_id(digest: bytes) -> str:
    """How a key is named to people: the first 12 hex digits of its hash."""
    return digest.hex()[:12]


def _read_secret() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("API key: ").strip()
    return sys.stdin.readline().strip()


@database_command
def keys_add(args: argparse.Namespace) -> int:
    secret = _read_secret()
    if not secret:
        raise AdminError("no key given: pass the secret on stdin")
    if not args.principal.strip():
        raise AdminError("--principal must not be empty")
    digest = hashlib.sha256(secret.encode()).digest()
    try:
        with connect() as conn:
            conn.execute(
                "INSERT INTO api_keys (key_hash, principal_id) VALUES (%s, %s)",
                (digest, args.principal),
            )
    except psycopg.errors.UniqueViolation:
        raise AdminError(f"this key is already registered (key id {key_id(digest)})") from None
    print(f"added key {key_id(digest)} for principal {args.principal}")
    return 0


@database_command
def keys_revoke(args: argparse.Namespace) -> int:
    prefix = args.key_id.strip().lower()
    if len(prefix) < _MIN_KEY_PREFIX or not all(c in "0123456789abcdef" for c in prefix):
        raise AdminError(f"a key id is at least {_MIN_KEY_PREFIX} hex digits")
    with connect() as conn, conn.transaction():
        rows = conn.execute(
            "SELECT key_hash, revoked_at FROM api_keys"
            " WHERE encode(key_hash, 'hex') LIKE %s FOR UPDATE",
            (prefix + "%",),
        ).fetchall()
        if len(rows) != 1:
            found = "no key" if not rows else f"{len(rows)} keys"
            raise AdminError(f"{found} match {prefix}: give a longer key id")
        digest, revoked_at = rows[0]
        if revoked_at is None:
            conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_hash = %s", (digest,))
    print(f"revoked key {key_id(digest)}")
    return 0


@database_command
def keys_list(args: argparse.Namespace) -> int:
    with connect() as conn:
        rows = conn.execute(
            "SELECT key_hash, principal_id, created_at, revoked_at FROM api_keys"
            " ORDER BY principal_id, created_at"
        ).fetchall()
    show(("key_id", "principal", "created_at", "revoked_at"), _key_rows(rows), as_json=args.json)
    return 0


def _key_rows(rows: Sequence[TupleRow]) -> list[tuple[Any, ...]]:
    return [(key_id(bytes(row[0])), *row[1:]) for row in rows]


# --- cache --------------------------------------------------------------------------------


def _register_cache(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = _actions(sub, "cache", "inspect or purge prefix-index entries")
    purge = actions.add_parser("purge", help="delete a principal's entries")
    purge.add_argument("--principal", required=True)
    purge.add_argument("--model", help="only this model's entries")
    purge.set_defaults(func=cache_purge)
    stats = actions.add_parser("stats", help="entries and live entries per model and tier")
    _add_json(stats)
    stats.set_defaults(func=cache_stats)


@database_command
def cache_purge(args: argparse.Namespace) -> int:
    with connect() as conn:
        deleted = conn.execute(
            "DELETE FROM prompt_cache_entries WHERE principal_id = %s"
            " AND (%s::text IS NULL OR virtual_model = %s)",
            (args.principal, args.model, args.model),
        ).rowcount
    print(f"purged {deleted} entries")
    return 0


@database_command
def cache_stats(args: argparse.Namespace) -> int:
    with connect() as conn:
        rows = conn.execute(
            "SELECT virtual_model, ttl_tier, count(*),"
            " count(*) FILTER (WHERE expires_at > now())"
            " FROM prompt_cache_entries GROUP BY 1, 2"
            " ORDER BY 1, array_position(ARRAY['5m', '1h', '24h'], ttl_tier)"
        ).fetchall()
    show(("model", "tier", "entries", "live"), rows, as_json=args.json)
    return 0


# --- output -------------------------------------------------------------------------------


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def _json_value(value: object) -> object:
    return value if value is None or isinstance(value, (int, str)) else _text(value)


def show(columns: Sequence[str], rows: Sequence[Sequence[object]], *, as_json: bool) -> None:
    """Print rows as an aligned table, or as a JSON list of objects."""
    if as_json:
        records = [{c: _json_value(v) for c, v in zip(columns, row, strict=True)} for row in rows]
        sys.stdout.write(codec.pretty(records).decode())
        return
    cells = [list(columns), *([_text(v) for v in row] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        padded = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(padded).rstrip())
