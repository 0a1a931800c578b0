"""The chat-completions dialect as the specification reads it (DESIGN §3.0, §3.0.1, §4.1).

What the oracle says a body must become and whether its markers are valid, computed from the
standard library's parse only; ``tests.fuzz.targets`` compares ``extproc`` with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tests.fuzz import rules
from tests.fuzz.oracle import MARKER, Obj
from tests.fuzz.rules import Site, is_last, role_of, strip

INSERTIONS = (
    ',"stream_options":{"include_usage":true}',
    '{"include_usage":true}',
    ',"include_usage":true',
    "true",
)


def expected(doc: Any, strip_telemetry: bool, prefixes: tuple[str, ...]) -> Any:
    """The body the upstream must receive for ``doc`` (a JSON object)."""
    assert isinstance(doc, Obj)
    out = Obj()
    for index, (key, value) in enumerate(doc):
        if key == MARKER:
            continue
        if key in ("tools",) and isinstance(value, list):
            value = [strip(entry) for entry in value]
        elif key == "messages" and isinstance(value, list):
            effective = is_last(doc, key, index)
            value = [_message(m, effective, strip_telemetry, prefixes) for m in value]
        out.append((key, value))
    if doc.last("stream") is True:
        _include_usage(out)
    return out


def _message(
    message: Any, effective: bool, strip_telemetry: bool, prefixes: tuple[str, ...]
) -> Any:
    if not isinstance(message, Obj):
        return message
    role = role_of(message)
    out = Obj()
    for index, (key, value) in enumerate(message):
        if key == "tool_calls" and isinstance(value, list):
            value = [strip(call) for call in value]
        elif key == "content" and isinstance(value, list):
            drop = effective and is_last(message, key, index) and strip_telemetry
            value = rules.stripped_content(value, role, drop, prefixes)
        out.append((key, value))
    return out


def _include_usage(root: Obj) -> None:
    places = rules.members(root, "stream_options")
    if not places:
        root.append(("stream_options", Obj([("include_usage", True)])))
    for i in places:
        value = root[i][1]
        if value is None:
            root[i] = ("stream_options", Obj([("include_usage", True)]))
        elif isinstance(value, Obj):
            flags = rules.members(value, "include_usage")
            for j in flags:
                value[j] = ("include_usage", True)
            if not flags:
                value.append(("include_usage", True))


def sites(doc: Obj, prefixes: tuple[str, ...]) -> list[Site]:
    """Every block, in block order, with its marker."""
    found: list[Site] = []
    tools = doc.last("tools")
    if isinstance(tools, list):
        found += [Site(rules.marker_of(entry)) for entry in tools]
    messages = doc.last("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, Obj):
            continue
        role = role_of(message)
        found += rules.content_sites(message.last("content"), role, prefixes)
        calls = message.last("tool_calls")
        if role == "assistant" and isinstance(calls, list):
            found += [Site(rules.marker_of(call)) for call in calls]
    return found


def rejection(
    doc: Obj,
    enabled: frozenset[str],
    default: str,
    automatic_query: bool,
    prefixes: tuple[str, ...],
) -> str | None:
    """Why the markers of ``doc`` must be refused, or ``None`` when they are valid."""
    found = sites(doc, prefixes)
    return rules.rejection(found, doc.last(MARKER), enabled, default, automatic_query)


def holders(doc: Any) -> Iterator[Obj]:
    """Every object of a chat body where a marker is read or stripped (all copies)."""
    return rules.holders(doc, ("tools",), "messages", ("content", "tool_calls"))
