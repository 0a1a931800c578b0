"""The marker rules every dialect shares, as the specification states them (DESIGN §3.0-§4.2).

A dialect's oracle finds its blocks (``Site``) and the markers that place nothing (a Responses
item's marker its block overrides); ``rejection`` says whether they are valid, from the
standard library's parse only (``tests.fuzz.oracle``), never from ``extproc``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tests.fuzz.oracle import MARKER, Num, Obj

TIERS = ("5m", "1h", "24h")
MAX_BREAKPOINTS = 4


@dataclass(frozen=True, slots=True)
class Site:
    """One block: the marker it carries (``None``: none) and whether it may carry one."""

    marker: Any = None
    markable: bool = True


def holders(
    doc: Any,
    lists: tuple[str, ...],
    container: str,
    parts: tuple[str, ...],
    items: Callable[[Obj], bool] | None = None,
) -> Iterator[Obj]:
    """Every object of a body where a marker is read or stripped (all copies): the body, the
    objects of its top-level ``lists``, and the objects of each ``parts`` list of the objects in
    ``container``; with ``items``, each of those objects too, and only the parts of those it
    accepts."""
    if not isinstance(doc, Obj):
        return
    yield doc
    for key, value in doc:
        if key in lists and isinstance(value, list):
            yield from _objects(value)
        if key != container or not isinstance(value, list):
            continue
        for item in _objects(value):
            if items is not None:
                yield item
                if not items(item):
                    continue
            for name, part in item:
                if name in parts and isinstance(part, list):
                    yield from _objects(part)


def _objects(values: list[Any]) -> Iterator[Obj]:
    return (v for v in values if isinstance(v, Obj))


def strip(value: Any) -> Any:
    """An element without its markers (every copy); anything else as it is."""
    return value.without(MARKER) if isinstance(value, Obj) else value


def marker_of(value: Any) -> Any:
    """The marker an element carries: its last ``cache_control`` (absent: ``None``)."""
    return value.last(MARKER) if isinstance(value, Obj) else None


def members(doc: Obj, key: str) -> list[int]:
    """The positions of every member named ``key``."""
    return [i for i, (name, _) in enumerate(doc) if name == key]


def is_last(doc: Obj, key: str, index: int) -> bool:
    """Whether member ``index`` is the last one named ``key`` (the one a parser reads)."""
    return index == (members(doc, key) or [-1])[-1]


def is_string(value: Any) -> bool:
    """A JSON string (a number keeps its text in a ``Num``, which is no string of JSON's)."""
    return isinstance(value, str) and not isinstance(value, Num)


def role_of(holder: Obj) -> str:
    role = holder.last("role")
    return role if is_string(role) else ""


def is_telemetry(role: str, element: Any, prefixes: tuple[str, ...]) -> bool:
    """An unmarked text element of a ``system`` array content starting with a prefix (§3.0)."""
    if role != "system" or not isinstance(element, Obj) or marker_of(element) is not None:
        return False
    text = element.last("text")
    return is_string(text) and text.lstrip().startswith(prefixes)


def content_sites(
    content: Any, role: str, prefixes: tuple[str, ...], unmarkable: frozenset[str] = frozenset()
) -> list[Site]:
    """The blocks of a content value: a string is one, an array one per element (telemetry
    excepted), anything else none; an element whose ``type`` is in ``unmarkable`` may carry
    no marker."""
    if is_string(content):
        return [Site()]
    if not isinstance(content, list):
        return []
    return [
        Site(marker_of(e), _type_of(e) not in unmarkable)
        for e in content
        if not is_telemetry(role, e, prefixes)
    ]


def _type_of(element: Any) -> str:
    kind = element.last("type") if isinstance(element, Obj) else None
    return kind if is_string(kind) else ""


def stripped_content(
    content: list[Any], role: str, drop_telemetry: bool, prefixes: tuple[str, ...]
) -> list[Any]:
    """An array content as forwarded: markers stripped, telemetry cut when ``drop_telemetry``."""
    return [strip(e) for e in content if not (drop_telemetry and is_telemetry(role, e, prefixes))]


def rejection(
    sites: Sequence[Site],
    top: Any,
    enabled: frozenset[str],
    default: str,
    automatic_query: bool = False,
    loose: Iterable[Any] = (),
) -> str | None:
    """Why the markers must be refused (a reject reason's value), or ``None`` when valid.

    Block markers in block order (a marker on a block that may carry none included), then the
    ``loose`` markers, then the count, then the automatic one and its placement (§3.0.1).
    """
    tiers = []
    for site in sites:
        if site.marker is not None and not site.markable:
            return "marker_not_allowed"
        tier = tier_of(site.marker, enabled, default)
        if tier is not None and tier.startswith("!"):
            return tier[1:]
        tiers.append(tier)
    for marker in loose:
        tier = tier_of(marker, enabled, default)
        if tier is not None and tier.startswith("!"):
            return tier[1:]
    explicit = [t for t in tiers if t is not None]
    if len(explicit) > MAX_BREAKPOINTS:
        return "too_many_breakpoints"
    automatic = tier_of(top, enabled, default)
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


def tier_of(marker: Any, enabled: frozenset[str], default: str) -> str | None:
    """The tier a marker asks for, ``None`` for none, ``"!reason"`` for an invalid one (§4.1)."""
    if marker is None:
        return None
    if not isinstance(marker, Obj):
        return "!malformed_cache_control"
    kind = marker.last("type")
    if not is_string(kind):
        return "!malformed_cache_control"
    if kind != "ephemeral":
        return "!unsupported_type"
    if not marker.has("ttl"):
        return default
    ttl = marker.last("ttl")
    if not is_string(ttl):
        return "!malformed_cache_control"
    if ttl not in TIERS:
        return "!invalid_ttl"
    return ttl if ttl in enabled else "!tier_disabled"
