"""Splice the cache split into a response ``usage`` object and into a whole JSON body.

Rules:
* ``prompt_tokens`` and every key we do not own are kept; ``prompt_tokens_details`` keeps its
  other keys; the keys we own are ``prompt_tokens_details.cached_tokens``,
  ``cache_read_input_tokens``, ``cache_creation_input_tokens`` and ``cache_creation``;
* injection is idempotent: ``inject_usage(inject_usage(u, s), s) == inject_usage(u, s)``;
  the input object is never mutated;
* a split is plausible only when its counts are non-negative and, if ``prompt_tokens`` is an
  integer, read + creation does not exceed it; an implausible split is never shown: zeros are
  injected instead, the result says ``implausible`` and the caller vetoes the commit (a wrong
  discount is worse than none);
* a body that is not edited comes back as the very same ``bytes`` object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc.core import codec
from extproc.core.model import Split, Tier

ZERO_SPLIT = Split()


@dataclass(frozen=True, slots=True)
class Spliced:
    """A usage object with the cache fields injected, and whether the split had to be zeroed."""

    usage: dict[str, Any]
    implausible: bool


@dataclass(frozen=True, slots=True)
class JsonBodyEdit:
    """The result of editing a whole JSON response body, with the facts the verdict needs."""

    body: bytes
    usage_seen: bool = False
    error_seen: bool = False
    implausible: bool = False


def is_plausible(usage: Mapping[str, Any], split: Split) -> bool:
    """Whether ``split`` can be shown on ``usage`` without overstating the cached tokens."""
    counts = (split.read, *split.creation.values())
    if any(n < 0 for n in counts):
        return False
    prompt = usage.get("prompt_tokens")
    if isinstance(prompt, bool) or not isinstance(prompt, int):
        return True
    return split.read + split.creation_total <= prompt


def inject_usage(usage: Mapping[str, Any], split: Split) -> dict[str, Any]:
    """A copy of ``usage`` carrying ``split`` in the cache fields (no plausibility check)."""
    out = dict(usage)
    details = out.get("prompt_tokens_details")
    details = dict(details) if isinstance(details, dict) else {}
    details["cached_tokens"] = split.read
    out["prompt_tokens_details"] = details
    out["cache_read_input_tokens"] = split.read
    out["cache_creation_input_tokens"] = split.creation_total
    out["cache_creation"] = {tier.usage_key: split.created(tier) for tier in Tier}
    return out


def splice_usage(usage: Mapping[str, Any], split: Split) -> Spliced:
    """Inject ``split`` when plausible, else zeros flagged ``implausible`` (veto the commit)."""
    if is_plausible(usage, split):
        return Spliced(inject_usage(usage, split), implausible=False)
    return Spliced(inject_usage(usage, ZERO_SPLIT), implausible=True)


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
    spliced = splice_usage(usage, split)
    if spliced.usage == usage:
        return JsonBodyEdit(raw, True, error_seen, spliced.implausible)
    doc["usage"] = spliced.usage
    return JsonBodyEdit(codec.dumps(doc), True, error_seen, spliced.implausible)
