"""OpenAI's Responses dialect as the specification reads it (DESIGN §12.2, §3.0, §4.1).

* blocks: every ``tools[]`` entry, then ``instructions`` (a string is one block, an array one
  per element), then ``input``: a string is one block; in an array, a message item (``"type":
  "message"``, or no type and a ``role``) gives its ``content``'s blocks, and any other item
  (``function_call``, ``function_call_output``, ...) is one block; of duplicate members the
  last is read;
* markers are read on content parts, tools, items and the top level; a message item's marker
  marks its last block unless that block has its own, and when it places nothing (that block
  has its own, or the item has no block) it is still validated;
* every marker of those places is stripped, in every copy; a ``cache_control`` anywhere else
  (inside a tool's schema, in a non-message item's members) is content;
* telemetry blocks are those of a ``system`` array content (``instructions``, or a message
  item whose role is ``system``), cut from the read copy when the policy says so;
* nothing is ever inserted: a Responses stream ends with its usage unasked, and the route
  reads no ``cacheBreakpoint`` parameter (that is a chat route's, §3.0.1).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tests.fuzz import rules
from tests.fuzz.oracle import MARKER, Obj
from tests.fuzz.rules import Site, is_last, role_of, strip

INSERTIONS: tuple[str, ...] = ()


def is_message(item: Obj) -> bool:
    kind = item.last("type")
    return kind == "message" or (kind is None and item.has("role"))


def expected(doc: Any, strip_telemetry: bool, prefixes: tuple[str, ...]) -> Any:
    """The body the upstream must receive for ``doc`` (a JSON object)."""
    assert isinstance(doc, Obj)
    out = Obj()
    for index, (key, value) in enumerate(doc):
        if key == MARKER:
            continue
        drop = is_last(doc, key, index) and strip_telemetry
        if key == "tools" and isinstance(value, list):
            value = [strip(entry) for entry in value]
        elif key == "instructions" and isinstance(value, list):
            value = rules.stripped_content(value, "system", drop, prefixes)
        elif key == "input" and isinstance(value, list):
            value = [_item(item, drop, prefixes) for item in value]
        out.append((key, value))
    return out


def _item(item: Any, drop: bool, prefixes: tuple[str, ...]) -> Any:
    if not isinstance(item, Obj):
        return item
    if not is_message(item):
        return strip(item)
    role = role_of(item)
    out = Obj()
    for index, (key, value) in enumerate(item):
        if key == MARKER:
            continue
        if key == "content" and isinstance(value, list):
            last = drop and is_last(item, key, index)
            value = rules.stripped_content(value, role, last, prefixes)
        out.append((key, value))
    return out


def layout(doc: Obj, prefixes: tuple[str, ...]) -> tuple[list[Site], list[Any]]:
    """Every block in order with its marker, and the item markers that place nothing."""
    found: list[Site] = []
    loose: list[Any] = []
    tools = doc.last("tools")
    if isinstance(tools, list):
        found += [Site(rules.marker_of(entry)) for entry in tools]
    found += rules.content_sites(doc.last("instructions"), "system", prefixes)
    items = doc.last("input")
    if rules.is_string(items):
        found.append(Site())
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, Obj):
            continue
        marker = rules.marker_of(item)
        if not is_message(item):
            found.append(Site(marker))
            continue
        blocks = rules.content_sites(item.last("content"), role_of(item), prefixes)
        if marker is not None and blocks and blocks[-1].marker is None:
            blocks[-1] = Site(marker)
        elif marker is not None:
            loose.append(marker)
        found += blocks
    return found, loose


def rejection(
    doc: Obj,
    enabled: frozenset[str],
    default: str,
    automatic_query: bool,
    prefixes: tuple[str, ...],
) -> str | None:
    """Why the markers of ``doc`` must be refused, or ``None`` (the query flag is not read)."""
    found, loose = layout(doc, prefixes)
    return rules.rejection(found, doc.last(MARKER), enabled, default, loose=loose)


def holders(doc: Any) -> Iterator[Obj]:
    """Every object of a Responses body where a marker is read or stripped (all copies)."""
    return rules.holders(doc, ("tools", "instructions"), "input", ("content",), is_message)
