"""Splice the cache split into a response ``usage`` object and into a whole JSON body.

Rules:
* ``prompt_tokens`` and every key we do not own are kept; ``prompt_tokens_details`` keeps its
  other keys; the keys we own are ``prompt_tokens_details.cached_tokens``,
  ``cache_read_input_tokens``, ``cache_creation_input_tokens`` and ``cache_creation``;
* injection is idempotent: ``inject_usage(inject_usage(u, s), s) == inject_usage(u, s)``;
  the input object is never mutated;
* the split is shown as classify computed it (DESIGN §4.3): it is not checked against
  ``prompt_tokens``, which counts chat-template tokens our per-block counts never see;
* a body that is not edited comes back as the very same ``bytes`` object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc.core import codec
from extproc.core.model import Split, Tier


@dataclass(frozen=True, slots=True)
class JsonBodyEdit:
    """The result of editing a whole JSON response body, with the facts the verdict needs."""

    body: bytes
    usage_seen: bool = False
    error_seen: bool = False


def inject_usage(usage: Mapping[str, Any], split: Split) -> dict[str, Any]:
    """A copy of ``usage`` carrying ``split`` in the cache fields."""
    out = dict(usage)
    details = out.get("prompt_tokens_details")
    details = dict(details) if isinstance(details, dict) else {}
    details["cached_tokens"] = split.read
    out["prompt_tokens_details"] = details
    out["cache_read_input_tokens"] = split.read
    out["cache_creation_input_tokens"] = split.creation_total
    out["cache_creation"] = {tier.usage_key: split.created(tier) for tier in Tier}
    return out


def is_error_document(doc: Mapping[str, Any]) -> bool:
    """An error answer: an ``error`` object, or the older ``"object": "error"`` envelope."""
    return isinstance(doc.get("error"), dict) or doc.get("object") == "error"


def parse_object(data: bytes | bytearray | memoryview) -> dict[str, Any] | None:
    """``data`` parsed as a JSON object, or ``None`` when it is malformed or not an object."""
    try:
        doc = codec.loads(data)
    except codec.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def edit_json_body(raw: bytes, split: Split | None) -> JsonBodyEdit:
    """Splice ``split`` into the ``usage`` of a whole JSON body; ``None`` means inactive."""
    doc = parse_object(raw)
    if doc is None:
        return JsonBodyEdit(raw)
    usage = doc.get("usage")
    usage_seen = isinstance(usage, dict)
    error_seen = is_error_document(doc)
    if split is None or not isinstance(usage, dict):
        return JsonBodyEdit(raw, usage_seen, error_seen)
    edited = inject_usage(usage, split)
    if edited == usage:
        return JsonBodyEdit(raw, True, error_seen)
    doc["usage"] = edited
    return JsonBodyEdit(codec.dumps(doc), True, error_seen)
