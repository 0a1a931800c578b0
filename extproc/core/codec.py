"""The one JSON module: every parse and serialisation goes through here.

Rules:
* responses and our own documents are parsed and written with orjson (fast, strict);
* request bodies are read *losslessly* (``read_value``): integers keep every digit, numbers
  beyond a double and the constants ``NaN``/``Infinity`` keep their literal text (a
  ``Literal``, never a ``str``), escaped lone surrogates survive, and nesting has no depth
  limit; a client's body is never re-serialised, only spliced (``extproc.core.spans``);
* ``canonical`` is compact, keys sorted at every depth, raw UTF-8, ``/`` as is: byte for byte
  orjson's ``OPT_SORT_KEYS`` output wherever orjson can write the value, and a deterministic
  form in the same style where it cannot (huge integers, literals, surrogates, deep nesting).
"""

from __future__ import annotations

import json
import json.decoder
import math
import re
from collections.abc import Callable
from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError

# The stdlib's C string scanner: (text, offset after the opening quote, strict) -> (str, end).
scanstring: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


class Literal:
    """A number or constant kept as the client wrote it (``1e400``, ``NaN``, a huge integer).

    Not a ``str``: a number must never pass for a string (a marker's ``type``, a block's
    ``text``), and orjson refuses it, so it is always written back as its ``text``.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Literal) and other.text == self.text

    def __hash__(self) -> int:
        return hash((Literal, self.text))

    def __repr__(self) -> str:
        return f"Literal({self.text!r})"


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON text; raises ``JSONDecodeError`` on malformed input."""
    return orjson.loads(data)


def dumps(value: Any) -> bytes:
    """Compact JSON, keys in insertion order, non-ASCII as raw UTF-8."""
    return orjson.dumps(value)


def pretty(value: Any) -> bytes:
    """Indented JSON for people (CLI output)."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)


def dumps_value(value: Any) -> str:
    """Compact JSON text of a value read by ``read_value`` (keys in their order)."""
    try:
        return orjson.dumps(value).decode()
    except (orjson.JSONEncodeError, TypeError):
        return _canonical_slow(value, sort_keys=False).decode()


def detect_encoding(data: bytes) -> str:
    """The encoding of JSON text by its first bytes (UTF-8, -16 or -32, RFC 4627)."""
    return json.detect_encoding(data)


def quote(text: str) -> str:
    """``text`` as a JSON string literal, lone surrogates escaped (for messages)."""
    return _string(text).decode()


def canonical(value: Any) -> bytes:
    """Canonical JSON for hashing (see the module rules)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        return _canonical_slow(value)


# ---- lossless reading ----

_MAX_DIGITS = 4000  # below the interpreter's integer-conversion limit


def _parse_int(text: str) -> int | Literal:
    return int(text) if len(text) <= _MAX_DIGITS else Literal(text)


def _parse_float(text: str) -> float | Literal:
    value = float(text)
    return value if math.isfinite(value) else Literal(text)


_DECODER = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=Literal, strict=True
)


def read_value(text: str, start: int) -> tuple[Any, int]:
    """The JSON value at ``text[start]`` (no leading white space) and the offset after it.

    Raises ``ValueError`` when there is no valid value there.
    """
    try:
        value, end = _DECODER.raw_decode(text, start)
    except RecursionError:
        return _read_deep(text, start)
    return value, end


def read_string(text: str, start: int) -> tuple[str, int]:
    """The string whose opening quote is at ``text[start]``, and the offset after it."""
    if text.startswith('"', start):
        return scanstring(text, start + 1, True)
    raise ValueError(f"expected a string at offset {start}")


_TOKEN = re.compile(
    r"[ \t\n\r]*(?:(?P<punct>[{}\[\],:])|(?P<string>\")"
    r"|(?P<number>-?(?:0|[1-9][0-9]*)(?P<frac>\.[0-9]+)?(?P<exp>[eE][-+]?[0-9]+)?)"
    r"|(?P<word>true|false|null|NaN|-?Infinity))"
)
_WORDS: dict[str, Any] = {"true": True, "false": False, "null": None}


def _read_deep(text: str, start: int) -> tuple[Any, int]:
    """``read_value`` without recursion, for values nested deeper than the stack allows."""
    stack: list[list[Any] | dict[str, Any]] = []
    keys: list[str] = []
    pos = start
    while True:
        token, pos = _next_token(text, pos)
        value, pos = _scalar_or_open(token, text, pos)
        if isinstance(value, _Open):
            pos, closed = _close_if_empty(text, pos, value.container)
            if not closed:
                stack.append(value.container)
                if isinstance(value.container, dict):
                    key, pos = _member_key(text, pos)
                    keys.append(key)
                continue
            value = value.container
        while stack:
            container = stack[-1]
            if isinstance(container, dict):
                container[keys[-1]] = value
            else:
                container.append(value)
            token, pos = _next_token(text, pos)
            punct = token.group("punct")
            if punct == ",":
                if isinstance(container, dict):
                    keys[-1], pos = _member_key(text, pos)
                break
            if punct != ("}" if isinstance(container, dict) else "]"):
                raise ValueError(f"expected , or a closing bracket at offset {token.start()}")
            value = stack.pop()
            if isinstance(value, dict):
                keys.pop()
        else:
            return value, pos


class _Open:
    """A container that a token opened (the deep reader fills it)."""

    __slots__ = ("container",)

    def __init__(self, container: list[Any] | dict[str, Any]) -> None:
        self.container = container


def _next_token(text: str, pos: int) -> tuple[re.Match[str], int]:
    match = _TOKEN.match(text, pos)
    if match is None:
        raise ValueError(f"invalid JSON at offset {pos}")
    return match, match.end()


def _member_key(text: str, pos: int) -> tuple[str, int]:
    """The member name and its colon, starting at ``pos``; the offset after the colon."""
    token, pos = _next_token(text, pos)
    if token.group("string") is None:
        raise ValueError(f"expected a member name at offset {token.start()}")
    key, pos = scanstring(text, pos, True)
    colon, pos = _next_token(text, pos)
    if colon.group("punct") != ":":
        raise ValueError(f"expected : at offset {colon.start()}")
    return key, pos


def _scalar_or_open(token: re.Match[str], text: str, pos: int) -> tuple[Any, int]:
    """A scalar value, or an ``_Open`` for the container that ``token`` opens."""
    punct = token.group("punct")
    if punct == "{":
        return _Open({}), pos
    if punct == "[":
        return _Open([]), pos
    if token.group("string") is not None:
        return scanstring(text, pos, True)
    number = token.group("number")
    if number is not None:
        exact = token.group("frac") is None and token.group("exp") is None
        return (_parse_int(number) if exact else _parse_float(number)), pos
    word = token.group("word")
    if word is not None:
        return (_WORDS[word] if word in _WORDS else Literal(word)), pos
    raise ValueError(f"expected a JSON value at offset {token.start()}")


def _close_if_empty(text: str, pos: int, opened: list[Any] | dict[str, Any]) -> tuple[int, bool]:
    """Consume the closing bracket of a container that is empty."""
    closing = "}" if isinstance(opened, dict) else "]"
    probe = _TOKEN.match(text, pos)
    if probe is not None and probe.group("punct") == closing:
        return probe.end(), True
    return pos, False


# ---- canonical form where orjson cannot write the value ----


def _canonical_slow(value: Any, sort_keys: bool = True) -> bytes:
    """``canonical`` without recursion, for values orjson refuses."""
    out: list[bytes] = []
    work: list[Any] = [value]
    while work:
        item = work.pop()
        if isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, dict):
            _push_object(item, work, sort_keys)
        elif isinstance(item, list | tuple):
            _push_array(item, work)
        else:
            out.append(_scalar(item))
    return b"".join(out)


def _push_object(value: dict[str, Any], work: list[Any], sort_keys: bool) -> None:
    parts: list[Any] = [b"{"]
    for i, key in enumerate(sorted(value) if sort_keys else value):
        parts += [b"," if i else b"", _string(key), b":", value[key]]
    parts.append(b"}")
    work.extend(reversed(parts))


def _push_array(value: list[Any] | tuple[Any, ...], work: list[Any]) -> None:
    parts: list[Any] = [b"["]
    for i, element in enumerate(value):
        parts += [b"," if i else b"", element]
    parts.append(b"]")
    work.extend(reversed(parts))


def _scalar(value: Any) -> bytes:
    if isinstance(value, Literal):
        return value.text.encode()
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, bool) or value is None:
        return orjson.dumps(value)
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        return orjson.dumps(value)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _string(text: str) -> bytes:
    try:
        return orjson.dumps(text)
    except orjson.JSONEncodeError:  # lone surrogates: escaped, the rest as orjson writes it
        return json.dumps(text, ensure_ascii=False).encode("utf-8", "backslashreplace")
