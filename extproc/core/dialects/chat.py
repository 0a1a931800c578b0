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

from typing import Any

from extproc.core import spans
from extproc.core.dialects.api import Dialect
from extproc.core.dialects.blocks import Layout, Site, Telemetry, Walk
from extproc.core.markers import error_envelope
from extproc.core.model import RequestPolicy
from extproc.core.spans import SHALLOW, Arr, Member, Node, Obj, Splice
from extproc.core.sse import Kind
from extproc.core.usage import (
    DocumentEdit,
    UsageRule,
    edit_document,
    edited_text,
    engine_split,
    is_error_document,
    prompt_count,
)

__all__ = ["DIALECT", "SHAPE", "Layout", "Site", "Telemetry", "force_include_usage", "layout"]

NAME = "chat"
SUFFIX = "/chat/completions"
SHAPE = Obj(
    {
        "messages": Arr(Obj({"content": Arr(SHALLOW), "tool_calls": Arr(SHALLOW)})),
        "tools": Arr(SHALLOW),
        "stream_options": SHALLOW,
    }
)


class _Walk(Walk):
    """The chat order: tools, then each message's content and an assistant's tool calls."""

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


def layout(root: Node, policy: RequestPolicy, splice: Splice) -> Layout:
    """The blocks of a chat body (an object node read with ``SHAPE``); strips into ``splice``."""
    walk = _Walk(policy, splice)
    walk.entries(root.named("tools"), "tool_definition", "tools")
    walk.messages(root.named("messages"))
    top = walk.cut_markers(root)
    force_include_usage(root, splice)
    return walk.layout(top)


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


_TOP_SHAPE = Obj({"stream_options": SHALLOW})


def plain_body(raw: bytes, stream: bool) -> bytes:
    """A body without blocks of ours: only a stream's ``include_usage`` may change."""
    if not stream:
        return raw
    text = spans.decode(raw)
    root = spans.read(text, _TOP_SHAPE)
    splice = Splice()
    force_include_usage(root, splice)
    return spans.encode(splice.apply(text)) if splice else raw


# ---- the answer: usage in the body's and every chunk's top-level ``usage`` ----


def is_final(doc: dict[str, Any]) -> bool:
    """A usage frame after the tokens: no choices left, or one that finished."""
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices:
        return True
    return any(isinstance(c, dict) and c.get("finish_reason") is not None for c in choices)


class ChatAnswer:
    """A chat completion: a JSON body or ``chat.completion.chunk`` frames (stateless)."""

    triggers: tuple[bytes, ...] = ()
    completing: frozenset[Kind] = frozenset()

    def kind(self, doc: dict[str, Any]) -> Kind:
        if is_error_document(doc):
            return Kind.ERROR
        if not isinstance(doc.get("usage"), dict):
            return Kind.PLAIN
        return Kind.FINAL if is_final(doc) else Kind.USAGE

    def edit(self, text: str, rule: UsageRule) -> str | None:
        return edited_text(edit_document(text, rule))

    def edit_body(self, text: str, rule: UsageRule) -> DocumentEdit | None:
        return edit_document(text, rule)


ANSWER = ChatAnswer()


def _answer() -> ChatAnswer:
    return ANSWER


DIALECT = Dialect(
    name=NAME,
    suffix=SUFFIX,
    shape=SHAPE,
    layout=layout,
    plain_body=plain_body,
    error_envelope=error_envelope,
    answer=_answer,
    route="chat_completions",
    prompt_tokens=prompt_count,
    engine_read=engine_split,
    breakpoint_param=True,
)
