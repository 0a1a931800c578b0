"""Anthropic's Messages dialect as the specification reads it (DESIGN §12.1, §3.0, §4.1).

* blocks: every ``tools[]`` entry, then ``system`` (a string is one block, an array one per
  element), then every message's ``content`` (likewise); of duplicate members the last is
  read;
* markers are read on those blocks and at the top level; one on a ``thinking`` or
  ``redacted_thinking`` block is refused (``marker_not_allowed``), ``null`` excepted;
* every marker of those places is stripped, in every copy; a ``cache_control`` anywhere else
  (a message object, inside a tool schema or a ``tool_result``) is content;
* telemetry blocks are those of a ``system`` array content (the ``system`` member, or a
  message whose role is ``system``), cut from the read copy when the policy says so;
* nothing is ever inserted: a Messages stream carries its usage unasked, and the route reads
  no ``cacheBreakpoint`` parameter (that is a chat route's, §3.0.1).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tests.fuzz import rules
from tests.fuzz.oracle import MARKER, Obj
from tests.fuzz.rules import Site, is_last, role_of, strip

INSERTIONS: tuple[str, ...] = ()
UNMARKABLE = frozenset({"thinking", "redacted_thinking"})


def expected(doc: Any, strip_telemetry: bool, prefixes: tuple[str, ...]) -> Any:
    """The body the upstream must receive for ``doc`` (a JSON object)."""
    assert isinstance(doc, Obj)
    out = Obj()
    for index, (key, value) in enumerate(doc):
        if key == MARKER:
            continue
        effective = is_last(doc, key, index)
        if key == "tools" and isinstance(value, list):
            value = [strip(entry) for entry in value]
        elif key == "system" and isinstance(value, list):
            drop = effective and strip_telemetry
            value = rules.stripped_content(value, "system", drop, prefixes)
        elif key == "messages" and isinstance(value, list):
            value = [_message(m, effective and strip_telemetry, prefixes) for m in value]
        out.append((key, value))
    return out


def _message(message: Any, drop: bool, prefixes: tuple[str, ...]) -> Any:
    if not isinstance(message, Obj):
        return message
    role = role_of(message)
    out = Obj()
    for index, (key, value) in enumerate(message):
        if key == "content" and isinstance(value, list):
            last = drop and is_last(message, key, index)
            value = rules.stripped_content(value, role, last, prefixes)
        out.append((key, value))
    return out


def sites(doc: Obj, prefixes: tuple[str, ...]) -> list[Site]:
    """Every block, in Anthropic's prefix order, with its marker."""
    found: list[Site] = []
    tools = doc.last("tools")
    if isinstance(tools, list):
        found += [Site(rules.marker_of(entry)) for entry in tools]
    found += rules.content_sites(doc.last("system"), "system", prefixes, UNMARKABLE)
    messages = doc.last("messages")
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, Obj):
            role = role_of(message)
            found += rules.content_sites(message.last("content"), role, prefixes, UNMARKABLE)
    return found


def rejection(
    doc: Obj,
    enabled: frozenset[str],
    default: str,
    automatic_query: bool,
    prefixes: tuple[str, ...],
) -> str | None:
    """Why the markers of ``doc`` must be refused, or ``None`` (the query flag is not read)."""
    return rules.rejection(sites(doc, prefixes), doc.last(MARKER), enabled, default)


def holders(doc: Any) -> Iterator[Obj]:
    """Every object of a Messages body where a marker is read or stripped (all copies)."""
    return rules.holders(doc, ("tools", "system"), "messages", ("content",))
