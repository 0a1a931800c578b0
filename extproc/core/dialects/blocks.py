"""What every request dialect finds in a body: block sites, telemetry blocks, marker cuts.

Rules:
* a site is one block in prefix order: its role, type, segment text (what is tokenized),
  hash body (canonical JSON without its own ``cache_control``), place and marker;
* ``Walk.cut_markers`` cuts every ``cache_control`` member of one object (duplicates
  included) and answers the last one's value, the one a common parser reads;
* an array content is one block per element; a string content is one text block; an
  unmarked text element of a ``system`` array content whose text starts with a telemetry
  prefix is not a block (the policy says whether it is cut from the forwarded body too);
* ``Walk.segment`` is the dialect's rule for what of a content element is tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc.core import codec
from extproc.core.model import RequestPolicy
from extproc.core.prefix import MARKER_KEY, object_body, string_body, value_body
from extproc.core.spans import Node, Splice


@dataclass(frozen=True, slots=True)
class Site:
    """A block found in the body, with the marker it carries (``None`` for none)."""

    role: str
    kind: str
    text: str
    body: bytes
    where: str
    marker: object = None
    markable: bool = True  # False: a non-null marker here is refused (a thinking block)


@dataclass(frozen=True, slots=True)
class Telemetry:
    """A telemetry block left out of the blocks: where it is and how long its text is."""

    where: str
    text_length: int


@dataclass(frozen=True, slots=True)
class Layout:
    """What the body holds: its blocks in prefix order, telemetry, the top-level marker.

    ``loose`` are markers that are validated and stripped but place no breakpoint (a marker
    a more specific one overrides).
    """

    sites: tuple[Site, ...]
    telemetry: tuple[Telemetry, ...]
    top_marker: object
    loose: tuple[object, ...] = ()


def text_segment(value: dict[str, Any]) -> str:
    """The common segment rule: the element's ``text`` when it is a string, else nothing."""
    text = value.get("text")
    return text if isinstance(text, str) else ""


class Walk:
    """One pass over a body, collecting sites and the cuts that strip markers."""

    def __init__(self, policy: RequestPolicy, splice: Splice) -> None:
        self.policy = policy
        self.splice = splice
        self.sites: list[Site] = []
        self.telemetry: list[Telemetry] = []
        self.loose: list[object] = []

    def layout(self, top_marker: object) -> Layout:
        return Layout(tuple(self.sites), tuple(self.telemetry), top_marker, tuple(self.loose))

    def cut_markers(self, node: Node) -> object:
        """Cut every ``cache_control`` member of ``node``; the last one's value."""
        members = node.members or ()
        found = {i for i, m in enumerate(members) if m.key == MARKER_KEY}
        if not found:
            return None
        self.splice.cut_members(members, found)
        return members[max(found)].node.value

    def entries(self, occurrences: tuple[Any, ...], role: str, where: str) -> None:
        """Every entry of an array member (``tools``): one block each, its JSON the segment."""
        for n, member in enumerate(occurrences):
            for i, entry in enumerate(member.node.items or ()):
                marker = self.cut_markers(entry)
                if n == len(occurrences) - 1:
                    self.entry_site(role, entry.value, f"{where}[{i}]", marker)

    def entry_site(self, role: str, value: Any, where: str, marker: object) -> None:
        """A block whose segment is its own canonical JSON (tools, tool calls)."""
        body = value_body(value)
        kind = value.get("type") if isinstance(value, dict) else None
        text = body.decode("utf-8")
        self.sites.append(
            Site(role, kind if isinstance(kind, str) else "", text, body, where, marker)
        )

    def content(self, content: Node, role: str, where: str, effective: bool) -> None:
        """A content value: a string is one text block, an array one block per element."""
        if isinstance(content.value, str):
            if effective:
                body = string_body(content.value)
                self.sites.append(Site(role, "text", content.value, body, where))
            return
        cut: set[int] = set()
        for i, element in enumerate(content.items or ()):
            marker = self.cut_markers(element)
            if not effective:
                continue
            if self.is_telemetry(role, element.value, marker):
                self.telemetry.append(Telemetry(f"{where}[{i}]", len(element.value["text"])))
                cut.add(i)
            else:
                self.sites.append(self.content_site(role, element.value, f"{where}[{i}]", marker))
        if cut and self.policy.strip_telemetry:
            self.splice.cut_members(content.items or (), cut)

    def content_site(self, role: str, value: Any, where: str, marker: object) -> Site:
        if not isinstance(value, dict):
            return Site(role, "", "", codec.canonical(value), where)
        kind = value.get("type")
        kind = kind if isinstance(kind, str) else ""
        segment = self.segment(kind, value)
        body = object_body(value)
        return Site(role, kind, segment, body, where, marker, self.is_markable(kind))

    def segment(self, kind: str, value: dict[str, Any]) -> str:
        """What of a content element is tokenized (the dialect's rule)."""
        return text_segment(value)

    def is_markable(self, kind: str) -> bool:
        """Whether a content element of type ``kind`` may carry a marker (the dialect's rule)."""
        return True

    def is_telemetry(self, role: str, value: Any, marker: object) -> bool:
        if role != "system" or marker is not None or not isinstance(value, dict):
            return False
        text = value.get("text")
        return isinstance(text, str) and text.lstrip().startswith(self.policy.telemetry_prefixes)
