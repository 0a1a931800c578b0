"""Read a request body losslessly, with the offsets of the parts we own, and splice edits into it.

A client's body is never re-serialised: the forwarded body is the received text with a few
spans cut out or replaced, so every value we do not own reaches the upstream exactly as sent.

Rules:
* ``read`` follows a ``Shape``: where the shape names an object or an array, the reader walks
  it and records each member's or element's offsets; everywhere else it reads the value whole
  (``codec.read_value``), so only the walked levels cost Python work;
* a walked object's ``value`` is a dict in which the last of duplicate names wins (as the
  common parsers do), while ``members`` keeps every occurrence, so an edit can reach them all;
* offsets index the text (``str``) that ``decode`` made from the bytes; ``encode`` turns it
  back into the same bytes, invalid UTF-8 included;
* ``Splice.apply`` applies non-overlapping edits; a cut inside a span that is cut whole is
  dropped; ``cut_members`` removes members (or elements) with their separating commas so the
  result is still valid JSON.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from extproc.core import codec

_WS = re.compile(r"[ \t\n\r]*")
_WS_CHARS = frozenset(" \t\n\r")
_BOM = "\ufeff"


class NotJson(ValueError):
    """The body is not one JSON value (with optional white space around it)."""


@dataclass(frozen=True, slots=True)
class Obj:
    """Walk an object; members named in ``members`` are walked by their own shape."""

    members: Mapping[str, Shape] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Arr:
    """Walk an array; every element by ``item``."""

    item: Shape


@dataclass(frozen=True, slots=True)
class Leaf:
    """Read the value whole."""


Shape = Obj | Arr | Leaf
LEAF = Leaf()
SHALLOW = Obj()
"""An object walked one level: its members' offsets, each member's value read whole."""


class Node(NamedTuple):
    """A value and where it is: ``text[start:end]``; ``members`` or ``items`` if walked.

    Nodes and members are named tuples: a body makes dozens of them, and a tuple is built
    several times faster than a frozen dataclass.
    """

    value: Any
    start: int
    end: int
    members: tuple[Member, ...] | None = None
    items: tuple[Node, ...] | None = None

    def get(self, key: str) -> Node | None:
        """The node of the last member named ``key`` (walked objects only)."""
        for member in reversed(self.members or ()):
            if member.key == key:
                node: Node = member.node
                return node
        return None

    def named(self, key: str) -> tuple[Member, ...]:
        """Every member named ``key``, duplicates included, in order."""
        return tuple(m for m in self.members or () if m.key == key)


class Member(NamedTuple):
    """One ``"key": value`` of a walked object; ``start`` is the key's opening quote."""

    key: str
    start: int
    node: Node

    @property
    def end(self) -> int:
        return self.node.end


def decode(raw: bytes) -> str:
    """The text of ``raw``: UTF-8, with invalid bytes kept reversibly."""
    return raw.decode("utf-8", "surrogateescape")


def encode(text: str) -> bytes:
    """The bytes ``decode`` made ``text`` from."""
    return text.encode("utf-8", "surrogateescape")


def read(text: str, shape: Shape) -> Node:
    """The body's root value, walked as ``shape``; raises ``NotJson``."""
    start = _skip(text, len(_BOM) if text.startswith(_BOM) else 0)
    try:
        node = _read(text, start, shape)
    except (ValueError, IndexError) as exc:
        raise NotJson(str(exc)) from None
    if _skip(text, node.end) != len(text):
        raise NotJson(f"data after the JSON value at offset {node.end}")
    return node


def _skip(text: str, pos: int) -> int:
    if text[pos : pos + 1] not in _WS_CHARS:  # most often none, or one space (json.dumps)
        return pos
    if text[pos + 1 : pos + 2] not in _WS_CHARS:
        return pos + 1
    match = _WS.match(text, pos)
    return pos if match is None else match.end()


def _read(text: str, pos: int, shape: Shape) -> Node:
    if isinstance(shape, Obj) and text.startswith("{", pos):
        return _read_object(text, pos, shape)
    if isinstance(shape, Arr) and text.startswith("[", pos):
        return _read_array(text, pos, shape)
    value, end = codec.read_value(text, pos)
    return Node(value, pos, end)


def _read_object(text: str, start: int, shape: Obj) -> Node:
    members: list[Member] = []
    value: dict[str, Any] = {}
    walked = shape.members
    pos = _skip(text, start + 1)
    if text.startswith("}", pos):
        return Node(value, start, pos + 1, ())
    while True:
        key, colon = codec.read_string(text, pos)
        colon = _skip(text, colon)
        if not text.startswith(":", colon):
            raise ValueError(f"expected : at offset {colon}")
        at = _skip(text, colon + 1)
        sub = walked.get(key)
        if sub is None:  # read whole: no dispatch
            leaf, end = codec.read_value(text, at)
            node = Node(leaf, at, end)
        else:
            node = _read(text, at, sub)
        members.append(Member(key, pos, node))
        value[key] = node.value
        pos = _skip(text, node.end)
        if text.startswith("}", pos):
            return Node(value, start, pos + 1, tuple(members))
        if not text.startswith(",", pos):
            raise ValueError(f"expected , or }} at offset {pos}")
        pos = _skip(text, pos + 1)


def _read_array(text: str, start: int, shape: Arr) -> Node:
    items: list[Node] = []
    pos = _skip(text, start + 1)
    if text.startswith("]", pos):
        return Node([], start, pos + 1, items=())
    while True:
        node = _read(text, pos, shape.item)
        items.append(node)
        pos = _skip(text, node.end)
        if text.startswith("]", pos):
            return Node([n.value for n in items], start, pos + 1, items=tuple(items))
        if not text.startswith(",", pos):
            raise ValueError(f"expected , or ] at offset {pos}")
        pos = _skip(text, pos + 1)


# ---- splicing ----


@dataclass(slots=True)
class Splice:
    """Edits to one text: ``(start, end, replacement)``, applied together by ``apply``."""

    edits: list[tuple[int, int, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.edits)

    def replace(self, start: int, end: int, text: str) -> None:
        self.edits.append((start, end, text))

    def insert(self, at: int, text: str) -> None:
        self.edits.append((at, at, text))

    def cut_members(self, spans: Sequence[Member] | Sequence[Node], cut: set[int]) -> None:
        """Remove the members (or elements) whose positions are in ``cut``, with their commas."""
        starts = [s.start for s in spans]
        ends = [s.end for s in spans]
        for i in sorted(cut):
            if any(j > i and j not in cut for j in range(len(spans))):
                self.edits.append((starts[i], starts[i + 1], ""))
            elif i == 0:
                self.edits.append((starts[0], ends[0], ""))
            else:
                self.edits.append((ends[i - 1], ends[i], ""))

    def apply(self, text: str) -> str:
        """``text`` with every edit made; an edit inside a removed span is dropped."""
        out: list[str] = []
        pos = 0
        for start, end, replacement in sorted(self.edits, key=_edit_order):
            if start < pos:
                continue
            out.append(text[pos:start])
            out.append(replacement)
            pos = end
        out.append(text[pos:])
        return "".join(out)


def _edit_order(edit: tuple[int, int, str]) -> tuple[int, bool, int]:
    """By start; at one offset insertions first, then the widest cut (it swallows the rest)."""
    start, end, _ = edit
    return start, end > start, -end
