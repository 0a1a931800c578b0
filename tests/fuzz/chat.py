"""The chat-completions dialect as the specification reads it (DESIGN §3.0, §3.0.1, §4.1).

What the oracle says a body must become and whether its markers are valid, computed from the
standard library's parse only; ``tests.fuzz.targets`` compares ``extproc`` with it.
"""

from __future__ import annotations

from typing import Any

from tests.fuzz.oracle import MARKER, Obj

TIERS = ("5m", "1h", "24h")
MAX_BREAKPOINTS = 4
INSERTIONS = (
    ',"stream_options":{"include_usage":true}',
    '{"include_usage":true}',
    ',"include_usage":true',
    "true",
)


def _strip(value: Any) -> Any:
    return value.without(MARKER) if isinstance(value, Obj) else value


def _marker(value: Any) -> Any:
    """The marker an element carries: its last ``cache_control`` (absent: ``None``)."""
    return value.last(MARKER) if isinstance(value, Obj) else None


def _members(doc: Obj, key: str) -> list[int]:
    return [i for i, (name, _) in enumerate(doc) if name == key]


def expected(doc: Any, strip_telemetry: bool, prefixes: tuple[str, ...]) -> Any:
    """The body the upstream must receive for ``doc`` (a JSON object)."""
    assert isinstance(doc, Obj)
    out = Obj()
    last_messages = (_members(doc, "messages") or [-1])[-1]
    for index, (key, value) in enumerate(doc):
        if key == MARKER:
            continue
        if key in ("tools",) and isinstance(value, list):
            value = [_strip(entry) for entry in value]
        elif key == "messages" and isinstance(value, list):
            effective = index == last_messages
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
    role = message.last("role")
    role = role if isinstance(role, str) else ""
    last_content = (_members(message, "content") or [-1])[-1]
    out = Obj()
    for index, (key, value) in enumerate(message):
        if key == "tool_calls" and isinstance(value, list):
            value = [_strip(call) for call in value]
        elif key == "content" and isinstance(value, list):
            last = effective and index == last_content
            kept = []
            for element in value:
                if last and strip_telemetry and _is_telemetry(role, element, prefixes):
                    continue
                kept.append(_strip(element))
            value = kept
        out.append((key, value))
    return out


def _is_telemetry(role: str, element: Any, prefixes: tuple[str, ...]) -> bool:
    if role != "system" or not isinstance(element, Obj) or _marker(element) is not None:
        return False
    text = element.last("text")
    return isinstance(text, str) and text.lstrip().startswith(prefixes)


def _include_usage(root: Obj) -> None:
    places = _members(root, "stream_options")
    if not places:
        root.append(("stream_options", Obj([("include_usage", True)])))
    for i in places:
        value = root[i][1]
        if value is None:
            root[i] = ("stream_options", Obj([("include_usage", True)]))
        elif isinstance(value, Obj):
            flags = _members(value, "include_usage")
            for j in flags:
                value[j] = ("include_usage", True)
            if not flags:
                value.append(("include_usage", True))


def sites(doc: Obj, prefixes: tuple[str, ...]) -> list[Any]:
    """The marker of every block, in block order (``None`` for an unmarked block)."""
    found: list[Any] = []
    tools = doc.last("tools")
    if isinstance(tools, list):
        found += [_marker(entry) for entry in tools]
    messages = doc.last("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, Obj):
            continue
        role = message.last("role")
        role = role if isinstance(role, str) else ""
        content = message.last("content")
        if isinstance(content, str):
            found.append(None)
        elif isinstance(content, list):
            found += [_marker(e) for e in content if not _is_telemetry(role, e, prefixes)]
        calls = message.last("tool_calls")
        if role == "assistant" and isinstance(calls, list):
            found += [_marker(call) for call in calls]
    return found


def rejection(
    doc: Obj,
    enabled: frozenset[str],
    default: str,
    automatic_query: bool,
    prefixes: tuple[str, ...],
) -> str | None:
    """Why the markers of ``doc`` must be refused, or ``None`` when they are valid."""
    tiers = []
    for marker in sites(doc, prefixes):
        tier = _tier(marker, enabled, default)
        if tier is not None and tier.startswith("!"):
            return tier[1:]
        tiers.append(tier)
    explicit = [t for t in tiers if t is not None]
    if len(explicit) > MAX_BREAKPOINTS:
        return "too_many_breakpoints"
    top = doc.last(MARKER)
    automatic = _tier(top, enabled, default)
    if automatic is None and automatic_query:
        automatic = "1h" if "1h" in enabled else "!tier_disabled"
    if automatic is None:
        return None
    if automatic.startswith("!"):
        return automatic[1:]
    if not tiers:
        return None
    if tiers[-1] is not None:
        return None if tiers[-1] == automatic else "automatic_ttl_conflict"
    return "automatic_no_slot" if len(explicit) >= MAX_BREAKPOINTS else None


def _tier(marker: Any, enabled: frozenset[str], default: str) -> str | None:
    """The tier a marker asks for, ``None`` for none, ``"!reason"`` for an invalid one."""
    if marker is None:
        return None
    if not isinstance(marker, Obj):
        return "!malformed_cache_control"
    kind = marker.last("type")
    if not isinstance(kind, str):
        return "!malformed_cache_control"
    if kind != "ephemeral":
        return "!unsupported_type"
    if not marker.has("ttl"):
        return default
    ttl = marker.last("ttl")
    if not isinstance(ttl, str):
        return "!malformed_cache_control"
    if ttl not in TIERS:
        return "!invalid_ttl"
    return ttl if ttl in enabled else "!tier_disabled"
