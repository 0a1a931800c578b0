"""OpenAI's Responses API (``POST …/v1/responses``): its blocks, markers and usage (DESIGN §12.2).

Rules:
* block order: every ``tools[]`` entry (role ``tool_definition``), then ``instructions`` (role
  ``system``: a string is one text block, an array one block per element), then ``input``: a
  string is one ``user`` text block; in an array, a message item (``"type": "message"``, or
  no type and a ``role``) gives its content (a string is one text block, an array one block
  per part) with the item's role; any other item is one block whose segment is its
  canonical JSON, role ``tool_call`` for ``function_call``, ``tool`` for
  ``function_call_output``, else its type;
* markers are read on content parts, tools, items and the top level (automatic caching); a
  message item's own marker marks its last block unless that block has its own (then the
  item's is only validated); of duplicate members the last is read, the markers of the
  others are only cut; a ``cache_control`` anywhere else is content;
* the 400 is the OpenAI envelope; a stream needs no option (its final event carries usage);
* usage lives in the body's ``usage`` and in ``response.usage`` of the final
  ``response.completed`` or ``response.incomplete`` event (earlier events carry
  ``"usage": null``); the split goes to ``input_tokens_details.cached_tokens`` and
  ``.cache_write_tokens`` plus chat's cache fields; ``input_tokens`` never changes;
* a final event completes the answer; ``response.failed`` and ``error`` are errors.
"""

from __future__ import annotations

from typing import Any

from extproc.core.dialects.api import Dialect
from extproc.core.dialects.blocks import Layout, Site, Walk
from extproc.core.markers import error_envelope
from extproc.core.model import RequestPolicy
from extproc.core.prefix import string_body
from extproc.core.spans import SHALLOW, Arr, Member, Node, Obj, Splice
from extproc.core.sse import Kind
from extproc.core.usage import (
    DocumentEdit,
    UsageFields,
    UsageRule,
    edit_at,
    edit_usage,
    edited_text,
    engine_split,
    prompt_count,
)

NAME = "responses"
SUFFIX = "/v1/responses"
SHAPE = Obj(
    {
        "tools": Arr(SHALLOW),
        "instructions": Arr(SHALLOW),
        "input": Arr(Obj({"content": Arr(SHALLOW)})),
    }
)
FIELDS = UsageFields(
    prompt="input_tokens", details="input_tokens_details", write="cache_write_tokens"
)
_ITEM_ROLES = {"function_call": "tool_call", "function_call_output": "tool"}
_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete"})
_ERROR_EVENTS = frozenset({"response.failed", "error"})


def _is_message(value: dict[str, Any]) -> bool:
    kind = value.get("type")
    return kind == "message" or (kind is None and "role" in value)


class _Walk(Walk):
    """The Responses order: tools, instructions, then the input items."""

    def instructions(self, occurrences: tuple[Member, ...]) -> None:
        for n, member in enumerate(occurrences):
            self.content(member.node, "system", "instructions", n == len(occurrences) - 1)

    def input(self, occurrences: tuple[Member, ...]) -> None:
        for n, member in enumerate(occurrences):
            effective = n == len(occurrences) - 1
            node = member.node
            if isinstance(node.value, str):
                if effective:
                    body = string_body(node.value)
                    self.sites.append(Site("user", "text", node.value, body, "input"))
                continue
            for i, item in enumerate(node.items or ()):
                self.item(item, f"input[{i}]", effective)

    def item(self, item: Node, where: str, effective: bool) -> None:
        if item.members is None:
            return
        marker = self.cut_markers(item)
        if not _is_message(item.value):
            if effective:
                kind = item.value.get("type")
                role = _ITEM_ROLES.get(kind, kind) if isinstance(kind, str) else ""
                self.entry_site(role, item.value, where, marker)
            return
        role = item.value.get("role")
        role = role if isinstance(role, str) else ""
        before = len(self.sites)
        contents = item.named("content")
        for k, content in enumerate(contents):
            last = effective and k == len(contents) - 1
            self.content(content.node, role, f"{where}.content", last)
        if effective:
            self.item_marker(marker, before)

    def item_marker(self, marker: object, before: int) -> None:
        """A message item's marker: on its last block, unless that block has its own."""
        if marker is None:
            return
        if len(self.sites) == before or self.sites[-1].marker is not None:
            self.loose.append(marker)
            return
        last = self.sites[-1]
        self.sites[-1] = Site(
            last.role, last.kind, last.text, last.body, last.where, marker, last.markable
        )


def layout(root: Node, policy: RequestPolicy, splice: Splice) -> Layout:
    """The blocks of a Responses body (read with ``SHAPE``); strips into ``splice``."""
    walk = _Walk(policy, splice)
    walk.entries(root.named("tools"), "tool_definition", "tools")
    walk.instructions(root.named("instructions"))
    walk.input(root.named("input"))
    return walk.layout(walk.cut_markers(root))


def plain_body(raw: bytes, stream: bool) -> bytes:
    """Nothing to add: a Responses stream always ends with its usage."""
    return raw


# ---- the answer ----


class ResponsesAnswer:
    """One Responses answer: a JSON response object, or its stream of typed events."""

    triggers: tuple[bytes, ...] = ()
    completing: frozenset[Kind] = frozenset({Kind.FINAL, Kind.STOP})

    def kind(self, doc: dict[str, Any]) -> Kind:
        kind = doc.get("type")
        if kind in _ERROR_EVENTS:
            return Kind.ERROR
        if kind in _FINAL_EVENTS:
            response = doc.get("response")
            usage = response.get("usage") if isinstance(response, dict) else None
            return Kind.FINAL if isinstance(usage, dict) else Kind.STOP
        return Kind.PLAIN

    def edit(self, text: str, rule: UsageRule) -> str | None:
        path = ("response", "usage")
        return edited_text(edit_at(text, path, lambda usage: edit_usage(usage, rule, FIELDS)))

    def edit_body(self, text: str, rule: UsageRule) -> DocumentEdit | None:
        return edit_at(text, ("usage",), lambda usage: edit_usage(usage, rule, FIELDS))


ANSWER = ResponsesAnswer()


def _answer() -> ResponsesAnswer:
    return ANSWER


DIALECT = Dialect(
    name=NAME,
    suffix=SUFFIX,
    shape=SHAPE,
    layout=layout,
    plain_body=plain_body,
    error_envelope=error_envelope,
    answer=_answer,
    route="responses",
    prompt_tokens=lambda usage: prompt_count(usage, FIELDS),
    engine_read=lambda usage: engine_split(usage, FIELDS),
)
