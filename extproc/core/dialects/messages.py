"""Anthropic's Messages API (``POST …/v1/messages``): its blocks, markers and usage (DESIGN §12.1).

Rules:
* block order is Anthropic's prefix order: every ``tools[]`` entry (role ``tool_definition``),
  then ``system`` (a string is one text block, an array one block per element, role
  ``system``), then every message's content (a string is one text block, an array one block
  per element, role = the message's role);
* segments: a text block's ``text``, a ``thinking`` block's ``thinking``, the canonical JSON of
  ``tool_use`` and ``tool_result`` blocks and of tool definitions, nothing for images,
  documents and other blocks without a string ``text``;
* markers are read on those blocks and at the top level (automatic caching); a non-null marker
  on a ``thinking`` or ``redacted_thinking`` block is refused; a ``cache_control`` anywhere
  else is content; telemetry blocks are recognised in an array ``system``;
* the 400 is Anthropic's envelope ``{"type": "error", "error": {"type":
  "invalid_request_error", "message": ...}}``; nothing else of the body changes (a stream
  always carries its usage: no option to force);
* usage has Anthropic's semantics: the upstream's total input is the sum of ``input_tokens``,
  ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` it sent (absent or not a
  count = 0; none of them at all: unknown, a stream then takes its start's); with a
  split the cache fields say ours and ``input_tokens`` becomes the rest (the cap keeps it
  ≥ 0); without one the engine's cache fields are scrubbed and ``input_tokens`` is the total;
* in a stream ``message_start``'s ``message.usage`` never waits (``Kind.USAGE``) and
  ``message_delta``'s ``usage`` does (``Kind.FINAL``); a delta without input counts takes the
  start's total, so it always carries the whole split; ``message_stop`` completes the answer
  and an ``error`` event is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extproc.core import codec
from extproc.core.dialects.api import Dialect
from extproc.core.dialects.blocks import Layout, Walk, text_segment
from extproc.core.errors import ClientError
from extproc.core.model import RequestPolicy, Split, Tier
from extproc.core.prefix import object_body
from extproc.core.spans import SHALLOW, Arr, Member, Node, Obj, Splice
from extproc.core.sse import Kind
from extproc.core.usage import (
    PROVIDER_FIELDS,
    DocumentEdit,
    UsageRule,
    capped,
    edit_at,
    is_count,
    is_error_document,
    node_at,
    read_object,
    splice_object,
)

NAME = "messages"
SUFFIX = "/v1/messages"
SHAPE = Obj(
    {
        "tools": Arr(SHALLOW),
        "system": Arr(SHALLOW),
        "messages": Arr(Obj({"content": Arr(SHALLOW)})),
    }
)
_JSON_SEGMENTS = frozenset({"tool_use", "tool_result"})
_UNMARKABLE = frozenset({"thinking", "redacted_thinking"})
INPUT_FIELDS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


class _Walk(Walk):
    """Anthropic's order: tools, system, then each message's content."""

    def system(self, occurrences: tuple[Member, ...]) -> None:
        for n, member in enumerate(occurrences):
            self.content(member.node, "system", "system", n == len(occurrences) - 1)

    def messages(self, occurrences: tuple[Member, ...]) -> None:
        for n, member in enumerate(occurrences):
            effective = n == len(occurrences) - 1
            for i, message in enumerate(member.node.items or ()):
                if message.members is None:
                    continue
                role = message.value.get("role")
                role = role if isinstance(role, str) else ""
                contents = message.named("content")
                for k, content in enumerate(contents):
                    last = effective and k == len(contents) - 1
                    self.content(content.node, role, f"messages[{i}].content", last)

    def segment(self, kind: str, value: dict[str, Any]) -> str:
        if kind == "thinking":
            thinking = value.get("thinking")
            return thinking if isinstance(thinking, str) else ""
        if kind in _JSON_SEGMENTS:
            return object_body(value).decode("utf-8")
        return text_segment(value)

    def is_markable(self, kind: str) -> bool:
        return kind not in _UNMARKABLE


def layout(root: Node, policy: RequestPolicy, splice: Splice) -> Layout:
    """The blocks of a Messages body (read with ``SHAPE``); strips into ``splice``."""
    walk = _Walk(policy, splice)
    walk.entries(root.named("tools"), "tool_definition", "tools")
    walk.system(root.named("system"))
    walk.messages(root.named("messages"))
    return walk.layout(walk.cut_markers(root))


def plain_body(raw: bytes, stream: bool) -> bytes:
    """Nothing to add: a Messages stream always carries its usage."""
    return raw


def error_envelope(err: ClientError) -> bytes:
    """Anthropic's error body for a refused request."""
    error = {"type": "invalid_request_error", "message": err.message}
    return codec.dumps({"type": "error", "error": error})


# ---- the answer ----


def upstream_total(usage: Mapping[str, Any]) -> int | None:
    """The upstream's whole input: the sum of its three input counts; ``None`` without any.

    A count that is not a non-negative integer (``null``, say) is as good as absent.
    """
    counts = [v for v in (usage.get(k) for k in INPUT_FIELDS) if is_count(v)]
    return sum(counts) if counts else None


def edit_usage(
    usage: Mapping[str, Any], rule: UsageRule, total: int | None, engine_read: int
) -> dict[str, Any] | None:
    """``usage`` with Anthropic's semantics applied (module rules); ``None`` when unchanged."""
    if rule.split is None:
        if not rule.scrub or not any(k in usage for k in PROVIDER_FIELDS):
            return None
        out = {k: v for k, v in usage.items() if k not in PROVIDER_FIELDS}
        if total is not None:
            out["input_tokens"] = total
        return None if out == usage else out
    split = Split(read=engine_read) if rule.engine else rule.split
    if total is not None:
        split = capped(split, total)
    out = {k: v for k, v in usage.items() if k not in PROVIDER_FIELDS}
    if total is not None:
        out["input_tokens"] = total - split.read - split.creation_total
    out["cache_creation_input_tokens"] = split.creation_total
    out["cache_read_input_tokens"] = split.read
    out["cache_creation"] = {
        tier.usage_key: split.created(tier)
        for tier in Tier
        if tier is not Tier.H24 or Tier.H24 in rule.tiers
    }
    return None if out == usage else out


def _engine_read(usage: Mapping[str, Any]) -> int | None:
    read = usage.get("cache_read_input_tokens")
    return read if is_count(read) else None


def engine_split(usage: Mapping[str, Any]) -> Split:
    """The engine's own read, as Messages reports it (no creation)."""
    return Split(read=_engine_read(usage) or 0)


_EVENT_SHAPE = Obj({"message": SHALLOW})


class MessagesAnswer:
    """One Messages response; in a stream it keeps ``message_start``'s input counts."""

    triggers: tuple[bytes, ...] = (b"message_stop",)
    completing: frozenset[Kind] = frozenset({Kind.STOP})

    def __init__(self) -> None:
        self._total: int | None = None
        self._engine_read = 0

    def kind(self, doc: dict[str, Any]) -> Kind:
        kind = doc.get("type")
        if kind == "error" or is_error_document(doc):
            return Kind.ERROR
        if kind == "message_start":
            message = doc.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            return Kind.USAGE if isinstance(usage, dict) else Kind.PLAIN
        if kind == "message_delta":
            return Kind.FINAL if isinstance(doc.get("usage"), dict) else Kind.PLAIN
        return Kind.STOP if kind == "message_stop" else Kind.PLAIN

    def edit(self, text: str, rule: UsageRule) -> str | None:
        root = read_object(text, _EVENT_SHAPE)
        if root is None:
            raise ValueError("the usage frame carries no JSON object")
        start = root.value.get("type") == "message_start"
        node = node_at(root, ("message", "usage") if start else ("usage",))
        new, _ = splice_object(text, node, lambda usage: self._edit(usage, rule, start))
        return new

    def _edit(self, usage: Mapping[str, Any], rule: UsageRule, start: bool) -> Any:
        total, read = upstream_total(usage), _engine_read(usage)
        if start:
            self._total, self._engine_read = total, read or 0
        return edit_usage(
            usage,
            rule,
            self._total if total is None else total,
            self._engine_read if read is None else read,
        )

    def edit_body(self, text: str, rule: UsageRule) -> DocumentEdit | None:
        return edit_at(
            text,
            ("usage",),
            lambda usage: edit_usage(usage, rule, upstream_total(usage), _engine_read(usage) or 0),
        )


DIALECT = Dialect(
    name=NAME,
    suffix=SUFFIX,
    shape=SHAPE,
    layout=layout,
    plain_body=plain_body,
    error_envelope=error_envelope,
    answer=MessagesAnswer,
    route="messages",
    prompt_tokens=upstream_total,
    engine_read=engine_split,
)
