"""Write the cache accounting into a response ``usage`` object, and into a whole JSON body.

Rules:
* ``prompt_tokens`` and every key we do not own are kept; ``prompt_tokens_details`` keeps its
  other keys; we own ``prompt_tokens_details.cached_tokens``, ``cache_read_input_tokens``,
  ``cache_creation_input_tokens`` and ``cache_creation``, and remove the other provider cache
  fields (``PROVIDER_FIELDS``): only this sidecar writes cache accounting;
* without a split of ours the provider's cache fields are scrubbed (a non-zero
  ``cached_tokens`` becomes 0), unless scrubbing is off; an engine read takes the read from
  the engine's own ``cached_tokens``;
* never more cached than prompted: with an integer ``prompt_tokens``, a creation above it
  reports all zeros, else the read shrinks to ``prompt_tokens - creation``;
* editing is idempotent and never mutates its input; a usage object, or a body, with nothing
  to change comes back unchanged (the very same ``bytes`` for a body), and an edited body
  differs from the original only inside its ``usage`` value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeGuard

from extproc.core import codec, spans
from extproc.core.model import Classification, Split, Tier

PROVIDER_FIELDS = (
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cache_creation",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
    "cache_discount",
)
_DETAILS = "prompt_tokens_details"


@dataclass(frozen=True, slots=True)
class UsageRule:
    """What a usage object gets: our ``split``, the engine's read, or (neither) a scrub."""

    split: Split | None = None
    engine: bool = False
    scrub: bool = True
    tiers: frozenset[Tier] = field(default=frozenset(Tier))

    @classmethod
    def of(
        cls,
        classification: Classification | None,
        scrub: bool,
        tiers: frozenset[Tier] = frozenset(Tier),
    ) -> UsageRule:
        """The rule for a classification (``None``: not known yet, so no split of ours)."""
        if classification is None or classification.split is None:
            return cls(None, scrub=scrub, tiers=tiers)
        return cls(classification.split, classification.engine, scrub, tiers)


@dataclass(frozen=True, slots=True)
class JsonBodyEdit:
    """The result of editing a whole JSON response body, with the facts the verdict needs."""

    body: bytes
    usage_seen: bool = False
    error_seen: bool = False
    usage: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class UsageFields:
    """Where an API's usage keeps its prompt count and the engine's cache details."""

    prompt: str = "prompt_tokens"
    details: str = _DETAILS
    write: str | None = None  # the details' cache-write count, where the API has one


CHAT_FIELDS = UsageFields()


def edit_usage(
    usage: Mapping[str, Any], rule: UsageRule, fields: UsageFields = CHAT_FIELDS
) -> dict[str, Any] | None:
    """``usage`` as ``rule`` says, or ``None`` when nothing changes."""
    if rule.split is None:
        edited = scrub_usage(usage, fields) if rule.scrub else None
    else:
        split = engine_split(usage, fields) if rule.engine else rule.split
        edited = inject_usage(usage, capped(split, usage.get(fields.prompt)), fields)
    return None if edited is None or edited == usage else edited


def inject_usage(
    usage: Mapping[str, Any], split: Split, fields: UsageFields = CHAT_FIELDS
) -> dict[str, Any]:
    """A copy of ``usage`` carrying ``split`` in the cache fields, other providers' removed."""
    out = {k: v for k, v in usage.items() if k not in PROVIDER_FIELDS}
    details = out.get(fields.details)
    details = dict(details) if isinstance(details, dict) else {}
    details["cached_tokens"] = split.read
    if fields.write is not None:
        details[fields.write] = split.creation_total
    out[fields.details] = details
    out["cache_read_input_tokens"] = split.read
    out["cache_creation_input_tokens"] = split.creation_total
    out["cache_creation"] = {tier.usage_key: split.created(tier) for tier in Tier}
    return out


def scrub_usage(
    usage: Mapping[str, Any], fields: UsageFields = CHAT_FIELDS
) -> dict[str, Any] | None:
    """``usage`` without provider cache fields, or ``None`` when it has none."""
    details = usage.get(fields.details)
    counts = ("cached_tokens",) if fields.write is None else ("cached_tokens", fields.write)
    reset = [k for k in counts if isinstance(details, dict) and details.get(k) not in (None, 0)]
    if not reset and not any(k in usage for k in PROVIDER_FIELDS):
        return None
    out = {k: v for k, v in usage.items() if k not in PROVIDER_FIELDS}
    if reset and isinstance(details, dict):
        out[fields.details] = {**details, **dict.fromkeys(reset, 0)}
    return out


def engine_split(usage: Mapping[str, Any], fields: UsageFields = CHAT_FIELDS) -> Split:
    """The engine's own prefix-cache hits as the read (no creation)."""
    details = usage.get(fields.details)
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Split(read=cached if is_count(cached) else 0)


def prompt_count(usage: Mapping[str, Any], fields: UsageFields = CHAT_FIELDS) -> int | None:
    """The upstream's prompt count where ``fields`` say it is; ``None`` when it is no count."""
    value = usage.get(fields.prompt)
    return value if is_count(value) else None


def capped(split: Split, prompt_tokens: object) -> Split:
    """Never more cached than prompted (see the module rules)."""
    if not is_count(prompt_tokens):
        return split
    creation = split.creation_total
    if creation > prompt_tokens:
        return Split()
    if split.read + creation > prompt_tokens:
        return Split(read=prompt_tokens - creation, creation=split.creation)
    return split


def is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_error_document(doc: Mapping[str, Any]) -> bool:
    """An error answer: an ``error`` object, or the older ``"object": "error"`` envelope."""
    return isinstance(doc.get("error"), dict) or doc.get("object") == "error"


@dataclass(frozen=True, slots=True)
class DocumentEdit:
    """A JSON document edited in its ``usage``: the new text (``None``: unchanged) and facts.

    ``usage`` is the usage object as the upstream wrote it (before the edit).
    """

    text: str | None
    usage_seen: bool
    error_seen: bool
    usage: Mapping[str, Any] | None = None


UsageEdit = Callable[[Mapping[str, Any]], "dict[str, Any] | None"]
_TOP = ("usage",)


def read_object(text: str, shape: spans.Shape) -> spans.Node | None:
    """The JSON object in ``text`` walked as ``shape``; ``None`` when it is not an object."""
    try:
        root = spans.read(text, shape)
    except spans.NotJson:
        return None
    return root if isinstance(root.value, dict) else None


def node_at(root: spans.Node, path: Sequence[str]) -> spans.Node | None:
    """The node at the member names ``path`` of a walked object (the last duplicate wins)."""
    node: spans.Node | None = root
    for key in path:
        node = None if node is None else node.get(key)
    return node


@cache
def path_shape(path: tuple[str, ...]) -> spans.Shape:
    """The shape that walks down to the member at ``path`` (its parent walked one level)."""
    shape: spans.Shape = spans.SHALLOW
    for key in reversed(path[:-1]):
        shape = spans.Obj({key: shape})
    return shape


def splice_object(text: str, node: spans.Node | None, edit: UsageEdit) -> tuple[str | None, bool]:
    """``text`` with the object at ``node`` edited (``None``: unchanged), and whether it is one."""
    if node is None or not isinstance(node.value, dict):
        return None, False
    edited = edit(node.value)
    if edited is None:
        return None, True
    return text[: node.start] + codec.dumps_value(edited) + text[node.end :], True


def edit_at(text: str, path: tuple[str, ...], edit: UsageEdit) -> DocumentEdit | None:
    """Apply ``edit`` to the usage object at ``path`` of a JSON object; ``None`` if not one.

    orjson reads the document first: only a document whose usage changes is walked for the
    offsets of its usage (and one orjson refuses is read losslessly). ``edit`` may be called
    twice on equal values (once per reading).
    """
    try:
        doc = codec.loads(text)
    except codec.JSONDecodeError:
        return _edit_at_walked(text, path, edit)
    if not isinstance(doc, dict):
        return None
    usage = _value_at(doc, path)
    if not isinstance(usage, dict):
        return DocumentEdit(None, False, is_error_document(doc))
    if edit(usage) is None:
        return DocumentEdit(None, True, is_error_document(doc), usage)
    return _edit_at_walked(text, path, edit)


def _value_at(doc: Mapping[str, Any], path: Sequence[str]) -> Any:
    value: Any = doc
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _edit_at_walked(text: str, path: tuple[str, ...], edit: UsageEdit) -> DocumentEdit | None:
    root = read_object(text, path_shape(path))
    if root is None:
        return None
    node = node_at(root, path)
    new, usage_seen = splice_object(text, node, edit)
    usage = node.value if usage_seen and node is not None else None
    return DocumentEdit(new, usage_seen, is_error_document(root.value), usage)


def edited_text(found: DocumentEdit | None) -> str | None:
    """The new text of an event's data edit; raises ``ValueError`` when it is not an object."""
    if found is None:
        raise ValueError("the usage frame carries no JSON object")
    return found.text


def edit_document(text: str, rule: UsageRule) -> DocumentEdit | None:
    """Apply ``rule`` to the top-level ``usage`` of a JSON object; ``None`` if not an object."""
    return edit_at(text, _TOP, lambda usage: edit_usage(usage, rule))


def _edit_walked(text: str, rule: UsageRule) -> DocumentEdit | None:
    """``edit_document`` by the lossless walk alone."""
    return _edit_at_walked(text, _TOP, lambda usage: edit_usage(usage, rule))


def edit_json_body(
    raw: bytes, rule: UsageRule, edit: Callable[[str, UsageRule], DocumentEdit | None] | None = None
) -> JsonBodyEdit:
    """Apply ``rule`` to the usage of a whole JSON body (``edit``: the API's, chat's by default)."""
    found = (edit or edit_document)(spans.decode(raw), rule)
    if found is None:
        return JsonBodyEdit(raw)
    body = raw if found.text is None else spans.encode(found.text)
    return JsonBodyEdit(body, found.usage_seen, found.error_seen, found.usage)


def parse_object(data: bytes | bytearray | memoryview) -> dict[str, Any] | None:
    """``data`` parsed as a JSON object, or ``None`` when it is malformed or not an object."""
    try:
        doc = codec.loads(data)
    except codec.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None
