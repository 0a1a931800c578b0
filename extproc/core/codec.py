"""The one JSON module: every parse and serialisation goes through orjson here."""

from __future__ import annotations

from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON text; raises ``JSONDecodeError`` on malformed input."""
    return orjson.loads(data)


def dumps(value: Any) -> bytes:
    """Compact JSON, keys in insertion order, non-ASCII as raw UTF-8."""
    return orjson.dumps(value)


def canonical(value: Any) -> bytes:
    """Canonical JSON for hashing: compact, keys sorted at every depth, raw UTF-8, ``/`` as is."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def pretty(value: Any) -> bytes:
    """Indented JSON for people (CLI output)."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
