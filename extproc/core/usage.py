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

from collections.abc import Mapping
from dataclasses import dataclass
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

    @classmethod
    def of(cls, classification: Classification | None, scrub: bool) -> UsageRule:
        """The rule for a classification (``None``: not known yet, so no split of ours)."""
        if classification is None or classification.split is None:
            return cls(None, scrub=scrub)
        return cls(classification.split, classification.engine, scrub)


@dataclass(frozen=True, slots=True)
class JsonBodyEdit:
    """The result of editing a whole JSON response body, with the facts the verdict needs."""

    body: bytes
    usage_seen: bool = False
    error_seen: bool = False
    usage: Mapping[str, Any] | None = None


def edit_usage(usage: Mapping[str, Any], rule: UsageRule) -> dict[str, Any] | None:
    """``usage`` as ``rule`` says, or ``None`` when nothing changes."""
    if rule.split is None:
        edited = scrub_usage(usage) if rule.scrub else None
    else:
        split = engine_split(usage) if rule.engine else rule.split
        edited = inject_usage(usage, capped(split, usage.get("prompt_tokens")))
    return None if edited is None or edited == usage else edited


def inject_usage(usage: Mapping[str, Any], split: Split) -> dict[str, Any]:
    """A copy of ``usage`` carrying ``split`` in the cache fields, other providers' removed."""
    out = {k: v for k, v in usage.items() if k not in PROVIDER_FIELDS}
    details = out.get(_DETAILS)
    details = dict(details) if isinstance(details, dict) else {}
    details["cached_tokens"] = split.read
    out[_DETAILS] = details
    out["cache_read_input_tokens"] = split.read
    out["cache_creation_input_tokens"] = split.creation_total
    out["cache_creation"] = {tier.usage_key: split.created(tier) for tier in Tier}
    return out


def scrub_usage(usage: Mapping[str, Any]) -> dict[str, Any] | None:
    """``usage`` without provider cache fields, or ``None`` when it has none."""
    details = usage.get(_DETAILS)
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    reset = cached is not None and cached != 0
    if not reset and not any(k in usage for k in PROVIDER_FIELDS):
        return None
    out = {k: v for k, v in usage.items() if k not in PROVIDER_FIELDS}
    if reset and isinstance(details, dict):
        out[_DETAILS] = {**details, "cached_tokens": 0}
    return out


def engine_split(usage: Mapping[str, Any]) -> Split:
    """The engine's own prefix-cache hits as the read (no creation)."""
    details = usage.get(_DETAILS)
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Split(read=cached if _is_count(cached) else 0)


def capped(split: Split, prompt_tokens: object) -> Split:
    """Never more cached than prompted (see the module rules)."""
    if not _is_count(prompt_tokens):
        return split
    creation = split.creation_total
    if creation > prompt_tokens:
        return Split()
    if split.read + creation > prompt_tokens:
        return Split(read=prompt_tokens - creation, creation=split.creation)
    return split


def _is_count(value: object) -> TypeGuard[int]:
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


_USAGE_SHAPE = spans.SHALLOW


def edit_document(text: str, rule: UsageRule) -> DocumentEdit | None:
    """Apply ``rule`` to the top-level ``usage`` of a JSON object; ``None`` if not an object.

    orjson reads the document first: only a document whose usage changes is walked for the
    offsets of its ``usage`` (and one orjson refuses is read losslessly).
    """
    try:
        doc = codec.loads(text)
    except codec.JSONDecodeError:
        return _edit_walked(text, rule)
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return DocumentEdit(None, False, is_error_document(doc))
    if edit_usage(usage, rule) is None:
        return DocumentEdit(None, True, is_error_document(doc), usage)
    return _edit_walked(text, rule)


def _edit_walked(text: str, rule: UsageRule) -> DocumentEdit | None:
    try:
        root = spans.read(text, _USAGE_SHAPE)
    except spans.NotJson:
        return None
    if not isinstance(root.value, dict):
        return None
    usage = root.get("usage")
    usage_seen = usage is not None and isinstance(usage.value, dict)
    error_seen = is_error_document(root.value)
    if usage is None or not usage_seen:
        return DocumentEdit(None, usage_seen, error_seen)
    edited = edit_usage(usage.value, rule)
    if edited is None:
        return DocumentEdit(None, usage_seen, error_seen, usage.value)
    new = text[: usage.start] + codec.dumps_value(edited) + text[usage.end :]
    return DocumentEdit(new, True, error_seen, usage.value)


def edit_json_body(raw: bytes, rule: UsageRule) -> JsonBodyEdit:
    """Apply ``rule`` to the ``usage`` of a whole JSON body."""
    found = edit_document(spans.decode(raw), rule)
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
