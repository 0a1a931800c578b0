"""An independent reading of request bodies and SSE streams, for the fuzz invariants.

Built on the standard library's JSON parser only (never on ``extproc.core``): objects become
``Obj`` (their members in order, duplicates kept), numbers keep their exact text (``Num``), so
two documents compare equal exactly when they hold the same values written the same way.
"""

from __future__ import annotations

import decimal
import json
import re
from dataclasses import dataclass
from typing import Any

MARKER = "cache_control"


class Obj(list[tuple[str, Any]]):
    """A JSON object: its members in order, duplicate names kept."""

    def last(self, key: str, default: Any = None) -> Any:
        for name, value in reversed(self):
            if name == key:
                return value
        return default

    def has(self, key: str) -> bool:
        return any(name == key for name, _ in self)

    def without(self, key: str) -> Obj:
        return Obj((k, v) for k, v in self if k != key)


class Num(str):
    """A JSON number as written."""


class NotJson(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise NotJson(name)  # NaN and Infinity are not JSON


def parse(data: bytes | str) -> Any:
    """``data`` as values (``Obj``, ``Num``, ...); raises ``NotJson``.

    Bytes are decoded as JSON text may be encoded (UTF-8, 16 or 32); invalid UTF-8 is read
    with each stray byte as a lone surrogate, so a parser that tolerates them is matched and
    the same bytes read the same whatever else the body holds (an encoded surrogate too: it
    is three stray bytes, not one character, with or without other invalid bytes around).
    """
    if isinstance(data, bytes):
        try:
            return parse(_decode(data))
        except UnicodeDecodeError:
            return parse(data.decode("utf-8", "surrogateescape"))
    try:
        return json.loads(
            data,
            object_pairs_hook=Obj,
            parse_float=Num,
            parse_int=Num,
            parse_constant=_reject_constant,
        )
    except (json.JSONDecodeError, RecursionError) as err:
        raise NotJson(str(err)) from err


def _decode(data: bytes) -> str:
    encoding = json.detect_encoding(data)
    errors = "surrogateescape" if encoding.startswith("utf-8") else "surrogatepass"
    return data.decode(encoding, errors)


def plain(value: Any) -> Any:
    """``value`` as ordinary Python values (last duplicate wins; numbers compared by value)."""
    if isinstance(value, Obj):
        return {k: plain(v) for k, v in value}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, Num):
        return decimal.Decimal(value)
    return value


def is_count(value: Any) -> bool:
    """A non-negative integer, as JSON writes one."""
    return (
        isinstance(value, Num) and re.fullmatch(r"-?[0-9]+", value) is not None and int(value) >= 0
    )


# ---- SSE, as the specification frames it ----

_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n|$)")


@dataclass(frozen=True, slots=True)
class Event:
    raw: bytes
    lines: tuple[tuple[bytes, bytes], ...]  # (content, line ending)
    complete: bool

    @property
    def data_lines(self) -> list[bytes]:
        return [c for c, _ in self.lines if c.startswith(b"data:") or c == b"data"]

    @property
    def other_lines(self) -> list[tuple[bytes, bytes]]:
        return [(c, e) for c, e in self.lines if not (c.startswith(b"data:") or c == b"data")]

    @property
    def payload(self) -> bytes | None:
        values = [_data_value(c) for c in self.data_lines]
        return b"\n".join(values) if values else None


def _data_value(line: bytes) -> bytes:
    value = line[5:]
    return value[1:] if value.startswith(b" ") else value


def events(data: bytes) -> list[Event]:
    """The stream's events, each ending with its blank line; an unterminated rest last."""
    out: list[Event] = []
    start, lines = 0, []
    position = 0
    for match in _LINE.finditer(data):
        if match.end() == match.start():
            break
        content, ending = match.group(1), match.group(2)
        position = match.end()
        if content == b"" and ending:
            lines.append((content, ending))
            out.append(Event(data[start:position], tuple(lines), True))
            start, lines = position, []
            continue
        lines.append((content, ending))
        if not ending:
            break
    if start < len(data):
        out.append(Event(data[start:], tuple(lines), False))
    return out
