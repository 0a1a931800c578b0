"""The chat-completions request: where its blocks and markers are (DESIGN §3, §3.0).

Rules:
* block order: every ``tools[]`` entry (role ``tool_definition``), then every message: its
  content blocks (a string content is one text block), then, for an ``assistant`` message,
  every ``tool_calls[]`` entry (role ``tool_call``);
* markers are read on content blocks, tool entries, assistant tool calls and the top level;
  a ``tool_calls[]`` marker of any other role is stripped but never read; a ``cache_control``
  anywhere else (a message object, inside a schema) is content and left alone;
* an unmarked text block in the array content of a ``system`` message whose text starts
  with a telemetry prefix is not a block; the policy says whether it is also cut;
* of duplicate member names the last is the one read, and markers are cut from every copy;
* on a stream, ``stream_options.include_usage`` is made ``true`` (a ``stream_options`` that is
  neither an object nor ``null`` is left alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc.core import codec
from extproc.core.model import RequestPolicy
from extproc.core.prefix import MARKER_KEY, object_body, string_body, value_body
from extproc.core.spans import SHALLOW, Arr, Member, Node, Obj, Splice

SHAPE = Obj(
    {
        "messages": Arr(Obj({"content": Arr(SHALLOW), "tool_calls": Arr(SHALLOW)})),
        "tools": Arr(SHALLOW),
        "stream_options": SHALLOW,
    }
)


@dataclass(frozen=True, slots=True)
class Site:
    """A block found in the body, with the marker it carries (``None`` for none)."""

    role: str
    kind: str
    text: str
    body: bytes
    where: str
    marker: object = None


@dataclass(frozen=True, slots=True)
class Telemetry:
    """A telemetry block left out of the blocks: where it is and how long its text is."""

    where: str
    text_length: int


@dataclass(frozen=True, slots=True)
class Layout:
    """What the body holds: its blocks in prefix order, telemetry, the top-level marker."""

    sites: tuple[Site, ...]
    telemetry: tuple[Telemetry, ...]
    top_marker: object


class _Walk:
    """One pass over a chat body, collecting sites and the cuts that strip markers."""

    def __init__(self, policy: RequestPolicy, splice: Splice) -> None:
        self.policy = policy
        self.splice = splice
        self.sites: list[Site] = []
        self.telemetry: list[Telemetry] = []

    def cut_markers(self, node: Node) -> object:
        """Cut every ``cache_control`` member of ``node``; the last one's value."""
        members = node.members or ()
        found = {i for i, m in enumerate(members) if m.key == MARKER_KEY}
        if not found:
            return None
        self.splice.cut_members(members, found)
        return members[max(found)].node.value

    def tools(self, occurrences: tuple[Member, ...]) -> None:
        for n, member in enumerate(occurrences):
            for i, entry in enumerate(member.node.items or ()):
                marker = self.cut_markers(entry)
                if n == len(occurrences) - 1:
                    self.entry_site("tool_definition", entry.value, f"tools[{i}]", marker)

    def entry_site(self, role: str, value: Any, where: str, marker: object) -> None:
        body = value_body(value)
        kind = value.get("type") if isinstance(value, dict) else None
        text = body.decode("utf-8")
        self.sites.append(
            Site(role, kind if isinstance(kind, str) else "", text, body, where, marker)
        )

    def messages(self, occurrences: tuple[Member, ...]) -> None:
        for n, member in enumerate(occurrences):
            effective = n == len(occurrences) - 1
            for i, message in enumerate(member.node.items or ()):
                self.message(message, f"messages[{i}]", effective)

    def message(self, message: Node, where: str, effective: bool) -> None:
        if message.members is None:
            return
        role = message.value.get("role")
        role = role if isinstance(role, str) else ""
        contents = message.named("content")
        for n, content in enumerate(contents):
            last = effective and n == len(contents) - 1
            self.content(content.node, role, f"{where}.content", last)
        calls = message.named("tool_calls")
        for n, calls_member in enumerate(calls):
            last = effective and role == "assistant" and n == len(calls) - 1
            for i, call in enumerate(calls_member.node.items or ()):
                marker = self.cut_markers(call)
                if last:
                    self.entry_site("tool_call", call.value, f"{where}.tool_calls[{i}]", marker)

    def content(self, content: Node, role: str, where: str, effective: bool) -> None:
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
                self.sites.append(_content_site(role, element.value, f"{where}[{i}]", marker))
        if cut and self.policy.strip_telemetry:
            self.splice.cut_members(content.items or (), cut)

    def is_telemetry(self, role: str, value: Any, marker: object) -> bool:
        if role != "system" or marker is not None or not isinstance(value, dict):
            return False
        text = value.get("text")
        return isinstance(text, str) and text.lstrip().startswith(self.policy.telemetry_prefixes)


def _content_site(role: str, value: Any, where: str, marker: object) -> Site:
    if not isinstance(value, dict):
        return Site(role, "", "", codec.canonical(value), where)
    kind, text = value.get("type"), value.get("text")
    return Site(
        role,
        kind if isinstance(kind, str) else "",
        text if isinstance(text, str) else "",
        object_body(value),
        where,
        marker,
    )


def layout(root: Node, policy: RequestPolicy, splice: Splice) -> Layout:
    """The blocks of a chat body (an object node read with ``SHAPE``); strips into ``splice``."""
    walk = _Walk(policy, splice)
    walk.tools(root.named("tools"))
    walk.messages(root.named("messages"))
    top = walk.cut_markers(root)
    force_include_usage(root, splice)
    return Layout(tuple(walk.sites), tuple(walk.telemetry), top)


def force_include_usage(root: Node, splice: Splice) -> None:
    """On a stream, make ``stream_options.include_usage`` true (edits into ``splice``)."""
    if root.value.get("stream") is not True:
        return
    options = root.named("stream_options")
    if not options:
        splice.insert(root.end - 1, ',"stream_options":{"include_usage":true}')
    for member in options:
        _include_usage(member.node, splice)


def _include_usage(options: Node, splice: Splice) -> None:
    if options.value is None:
        splice.replace(options.start, options.end, '{"include_usage":true}')
        return
    if options.members is None:
        return  # not an object: the upstream answers it
    flags = options.named("include_usage")
    for flag in flags:
        if flag.node.value is not True:
            splice.replace(flag.node.start, flag.node.end, "true")
    if not flags:
        comma = "," if options.members else ""
        splice.insert(options.end - 1, comma + '"include_usage":true')
