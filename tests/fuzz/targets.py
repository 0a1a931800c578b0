"""The fuzz targets and their invariants; each raises ``Violation`` when one does not hold.

* ``request:<dialect>`` — one request body through the route's ``prepare``: only the
  documented ``ClientError``s escape; a body it refuses has invalid markers by the oracle's
  reading (and is refused for the oracle's first reason), a body it accepts has valid ones;
  the forwarded body carries no marker, is the oracle's expected body value for value, and
  differs from the input only by deletions and the dialect's known insertions (an unchanged
  body is the very same bytes);
* ``sse`` — a response stream through ``SseAnswer`` in fuzzer-chosen chunks: every byte comes
  out once and in order, a stream whose rule edits nothing comes out identical, and an edited
  frame differs from its input only in ``usage``, which holds exactly the documented values;
  a body starting with ``{`` is also edited as a whole JSON answer (``edit_json_body``).

A leading byte in ``0x10..0x1f`` (no JSON or SSE text starts with one) chooses the options;
without it the defaults apply, so corpus files are plain bodies and streams.

Dialects plug in with one ``DIALECTS`` entry: the route's ``prepare`` and its oracle.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extproc.core import answers, usage
from extproc.core.dialects import api
from extproc.core.dialects import chat as chat_api
from extproc.core.dialects import messages as messages_api
from extproc.core.dialects import responses as responses_api
from extproc.core.errors import ClientError
from extproc.core.model import DEFAULT_TELEMETRY_PREFIXES, RequestPolicy, Split, Tier, TierPolicy
from extproc.core.request import Prepared, prepare
from tests.fuzz import chat, messages, oracle, responses
from tests.fuzz.oracle import MARKER, NotJson, Obj, is_count, parse, plain

MAX_DIFFED = 4096  # longer bodies skip the byte diff (its cost grows with the square)


class Violation(AssertionError):
    """An invariant did not hold."""


@dataclass(frozen=True, slots=True)
class Options:
    """What the leading option byte chose."""

    automatic_query: bool = False
    strip_telemetry: bool = True
    enabled: frozenset[str] = frozenset({"5m", "1h", "24h"})
    default: str = "5m"


_TIER_CHOICES = (
    (frozenset({"5m", "1h", "24h"}), "5m"),
    (frozenset({"5m", "1h"}), "5m"),
    (frozenset({"1h"}), "1h"),
    (frozenset({"5m", "24h"}), "24h"),
)


def request_options(data: bytes) -> tuple[Options, bytes]:
    if not data or not 0x10 <= data[0] <= 0x1F:
        return Options(), data
    flags = data[0] - 0x10
    enabled, default = _TIER_CHOICES[flags >> 2]
    return Options(bool(flags & 1), not flags & 2, enabled, default), data[1:]


def policy_of(options: Options) -> RequestPolicy:
    tiers = TierPolicy(frozenset(Tier(t) for t in options.enabled), Tier(options.default))
    return RequestPolicy(tiers=tiers, strip_telemetry=options.strip_telemetry)


@dataclass(frozen=True, slots=True)
class Dialect:
    """One request route: how the server prepares its bodies and how the oracle reads them."""

    name: str
    route: str
    prepare: Callable[[bytes, RequestPolicy, bool], Prepared | None]
    # The body the upstream must receive (``strip_telemetry``, telemetry prefixes).
    expected: Callable[[Obj, bool, tuple[str, ...]], Any]
    # Why the markers must be refused (a reject reason's value), or ``None``.
    rejection: Callable[[Obj, frozenset[str], str, bool, tuple[str, ...]], str | None]
    # Every object of a body where a marker is read or stripped.
    holders: Callable[[Any], Any]
    insertions: tuple[str, ...]


def route_prepare(dialect: api.Dialect) -> Callable[[bytes, RequestPolicy, bool], Prepared | None]:
    """``prepare`` as the session drives it on ``dialect``'s route: the ``cacheBreakpoint``
    parameter reaches it only where the route reads one (chat)."""

    def run(raw: bytes, policy: RequestPolicy, query_automatic: bool) -> Prepared | None:
        return prepare(raw, policy, query_automatic and dialect.breakpoint_param, dialect)

    return run


def _dialect(name: str, route: str, api_dialect: api.Dialect, oracle_module: Any) -> Dialect:
    """A route's entry: the server's ``prepare`` on it and the oracle module that reads it."""
    return Dialect(
        name=name,
        route=route,
        prepare=route_prepare(api_dialect),
        expected=oracle_module.expected,
        rejection=oracle_module.rejection,
        holders=oracle_module.holders,
        insertions=oracle_module.INSERTIONS,
    )


DIALECTS: dict[str, Dialect] = {
    d.name: d
    for d in (
        _dialect("chat", "/v1/chat/completions", chat_api.DIALECT, chat),
        _dialect("messages", "/v1/messages", messages_api.DIALECT, messages),
        _dialect("responses", "/v1/responses", responses_api.DIALECT, responses),
    )
}


def check_request(dialect: Dialect, data: bytes) -> None:
    """The request invariants for one fuzz input (see the module docstring)."""
    options, raw = request_options(data)
    prefixes = DEFAULT_TELEMETRY_PREFIXES
    try:
        doc: Any = parse(raw)
    except NotJson:
        doc = None
    try:
        prepared = dialect.prepare(raw, policy_of(options), options.automatic_query)
    except ClientError as err:
        if isinstance(doc, Obj):
            want = dialect.rejection(
                doc, options.enabled, options.default, options.automatic_query, prefixes
            )
            if want is None:
                raise Violation(f"refused valid markers ({err.code}: {err.message})") from err
            if err.reason.value != want:
                raise Violation(f"refused as {err.reason.value} instead of {want}") from err
        return
    if prepared is None:
        if isinstance(doc, Obj):
            raise Violation("a JSON object was forwarded unread")
        _no_marker(dialect, doc, "forwarded unread")
        return
    if not isinstance(doc, Obj):
        if MARKER.encode() in raw:
            raise Violation("read a body the standard parser refuses, and it names a marker")
        return
    want = dialect.rejection(
        doc, options.enabled, options.default, options.automatic_query, prefixes
    )
    if want is not None:
        raise Violation(f"accepted markers that must be refused: {want}")
    _check_forwarded(dialect, raw, doc, prepared, options, prefixes)


def _no_marker(dialect: Dialect, doc: Any, what: str) -> None:
    for holder in dialect.holders(doc):
        if holder.has(MARKER):
            raise Violation(f"{what} with a marker: {holder!r:.200}")


def _check_forwarded(
    dialect: Dialect,
    raw: bytes,
    doc: Obj,
    prepared: Prepared,
    options: Options,
    prefixes: tuple[str, ...],
) -> None:
    body = prepared.body
    if not prepared.changed and body is not raw:
        raise Violation("an unchanged body was copied")
    try:
        forwarded = parse(body)
    except NotJson as err:
        raise Violation(f"the forwarded body is not JSON: {err}") from err
    _no_marker(dialect, forwarded, "forwarded")
    expected = dialect.expected(doc, options.strip_telemetry, prefixes)
    if forwarded != expected:
        raise Violation(f"forwarded {forwarded!r:.300} instead of {expected!r:.300}")
    kept = _kept_prefix(raw, body)
    if kept == len(body):
        return  # deletions only
    if not dialect.insertions:
        raise Violation(f"bytes added beyond our edits at {kept}: {body[kept : kept + 40]!r}")
    if len(raw) <= MAX_DIFFED and len(body) <= MAX_DIFFED + 64:
        _only_known_insertions(raw, body, dialect.insertions)


def _kept_prefix(raw: bytes, body: bytes) -> int:
    """How much of ``body`` is a subsequence of ``raw`` (all of it: ``raw`` with deletions).

    Greedy matching decides a subsequence exactly, in linear time; a diff might align a
    deletion-only edit as a replacement.
    """
    position = 0
    for n, byte in enumerate(body):
        position = raw.find(byte, position) + 1
        if position == 0:
            return n
    return len(body)


def _only_known_insertions(raw: bytes, body: bytes, insertions: tuple[str, ...]) -> None:
    """``body`` is ``raw`` with deletions and pieces of the dialect's insertions only."""
    a, b = raw.decode("utf-8", "surrogateescape"), body.decode("utf-8", "surrogateescape")
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for op, _i1, _i2, j1, j2 in matcher.get_opcodes():
        if op in ("insert", "replace"):
            added = b[j1:j2]
            if not any(added in allowed for allowed in insertions):
                raise Violation(f"bytes added beyond our edits: {added!r:.200}")


# ---- responses ----

_RULES = (
    usage.UsageRule(None, scrub=False),
    usage.UsageRule(None, scrub=True),
    usage.UsageRule(Split(read=120, creation={Tier.M5: 30, Tier.H1: 7})),
    usage.UsageRule(Split(read=5000, creation={Tier.H24: 900})),
)


@dataclass(frozen=True, slots=True)
class StreamOptions:
    rule: usage.UsageRule
    known_after: int | None  # chunks before the classification is known (None: at the end)
    chunk: int  # bytes per chunk, 0: all in one


def stream_options(data: bytes) -> tuple[StreamOptions, bytes]:
    if len(data) < 2 or not 0x10 <= data[0] <= 0x1F:
        return StreamOptions(_RULES[2], 0, 0), data
    flags, size = data[0] - 0x10, data[1]
    known = (0, 1, 3, None)[flags >> 2]
    return StreamOptions(_RULES[flags & 3], known, size % 97), data[2:]


def check_sse(data: bytes) -> None:
    """The response invariants for one fuzz input (see the module docstring)."""
    options, raw = stream_options(data)
    if raw.lstrip()[:1] == b"{":
        _check_json_body(raw, options.rule)
    out, known_at = _run_stream(raw, options)
    _compare_streams(raw, out, known_at, options.rule)


def _run_stream(raw: bytes, options: StreamOptions) -> tuple[bytes, int]:
    """The stream's output, and the output offset from which the classification was known."""
    size = options.chunk or max(1, len(raw))
    chunks = [raw[i : i + size] for i in range(0, len(raw), size)] or [b""]
    answer = answers.SseAnswer(chat_api.DIALECT.answer())
    unknown = usage.UsageRule(None, scrub=options.rule.scrub)
    out = bytearray()
    known_at: int | None = None
    for n, chunk in enumerate(chunks):
        answer.feed(chunk, end_of_stream=n == len(chunks) - 1)
        known = options.known_after is not None and n >= options.known_after
        if known and known_at is None:
            known_at = len(out)
        sent = answer.drain(known, options.rule if known else unknown)
        if sent is None:  # the session joins the classification, then drains again
            if known:
                raise Violation("drain waited for a classification it had")
            if known_at is None:
                known_at = len(out)
            sent = answer.drain(True, options.rule)
            if sent is None:
                raise Violation("drain waited with the classification known")
        out += sent
    return bytes(out), len(out) if known_at is None else known_at


def _compare_streams(raw: bytes, out: bytes, known_at: int, rule: usage.UsageRule) -> None:
    unknown = usage.UsageRule(None, scrub=rule.scrub)
    if rule.split is None and not rule.scrub and out != raw:
        raise Violation("a stream with nothing to edit changed")
    got, want = oracle.events(out), oracle.events(raw)
    if len(got) != len(want):
        raise Violation(f"{len(want)} events came out as {len(got)}")
    offset = 0
    for before, after in zip(want, got, strict=True):
        applied = rule if offset >= known_at else unknown
        offset += len(after.raw)
        if not before.complete:
            if before.raw != after.raw:
                raise Violation("an unterminated rest was changed")
            continue
        frame = _usage_frame(before)
        if frame is None:
            if before.raw != after.raw:
                raise Violation(f"a frame without usage changed: {before.raw!r:.200}")
            continue
        if _is_final(frame):
            _check_frame(before, after, frame, rule)
            continue
        # A frame before the final one never waits: it gets the split when it is known by
        # then, else the rule without one. Bytes handed over with a drain that then waited
        # were edited before the classification came, though they leave with the next drain.
        try:
            _check_frame(before, after, frame, applied)
        except Violation:
            _check_frame(before, after, frame, unknown if applied is rule else rule)


def _usage_frame(event: oracle.Event) -> Obj | None:
    """The event's object when it is a usage-bearing frame by the documented rules."""
    raw = event.raw
    usage_keys = raw.count(b'"usage"')
    nulls = raw.count(b'"usage":null') + raw.count(b'"usage": null')
    payload = event.payload
    if payload is None or usage_keys <= nulls:
        return None
    try:
        doc = parse(payload)
    except NotJson:
        return None
    if not isinstance(doc, Obj) or not isinstance(doc.last("usage"), Obj):
        return None
    if isinstance(doc.last("error"), Obj) or doc.last("object") == "error":
        return None
    return doc


def _is_final(doc: Obj) -> bool:
    choices = doc.last("choices")
    if not isinstance(choices, list) or not choices:
        return True
    return any(isinstance(c, Obj) and c.last("finish_reason") is not None for c in choices)


def _check_frame(
    before: oracle.Event, after: oracle.Event, doc: Obj, rule: usage.UsageRule
) -> None:
    expected = expected_usage(doc.last("usage"), rule)
    if expected is None:
        if before.raw != after.raw:
            raise Violation(f"a usage frame with nothing to change changed: {before.raw!r:.200}")
        return
    if after.other_lines != before.other_lines:
        raise Violation("an edited frame lost or changed lines besides its data")
    new_lines = [line for line in after.data_lines if line not in before.data_lines]
    if len(new_lines) > 1:
        raise Violation(f"an edit rewrote {len(new_lines)} data lines: {after.raw!r:.300}")
    for spaced in (True, False):
        if all(line.startswith(b"data: ") is spaced for line in before.data_lines) and any(
            line.startswith(b"data: ") is not spaced for line in after.data_lines
        ):
            raise Violation(f"an edit changed how data lines are written: {after.raw!r:.300}")
    payload = after.payload
    edited = parse(payload) if payload is not None else None
    if not isinstance(edited, Obj):
        raise Violation("an edited frame is not JSON")
    _same_but_usage(doc, edited, expected)


def _same_but_usage(doc: Obj, edited: Obj, expected: dict[str, Any]) -> None:
    if doc.without("usage") != edited.without("usage"):
        raise Violation(f"edited beyond usage: {edited!r:.300}")
    got = plain(edited.last("usage"))
    if got != expected:
        raise Violation(f"usage {got!r:.300} instead of {expected!r:.300}")


PROVIDER_FIELDS = (
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cache_creation",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
    "cache_discount",
)


def expected_usage(value: Obj, rule: usage.UsageRule) -> dict[str, Any] | None:
    """What DESIGN §4.3 makes of a usage object, as plain values; ``None``: unchanged."""
    original = plain(value)
    out = {k: v for k, v in original.items() if k not in PROVIDER_FIELDS}
    details = original.get("prompt_tokens_details")
    if rule.split is None:
        if not rule.scrub:
            return None
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        reset = cached is not None and cached != 0
        if not reset and out == original:
            return None
        if reset:
            out["prompt_tokens_details"] = {**details, "cached_tokens": 0}
    else:
        read, creation = _capped(rule.split, value.last("prompt_tokens"))
        out["prompt_tokens_details"] = {
            **(details if isinstance(details, dict) else {}),
            "cached_tokens": read,
        }
        out["cache_read_input_tokens"] = read
        out["cache_creation_input_tokens"] = sum(creation.values())
        out["cache_creation"] = {
            f"ephemeral_{tier}_input_tokens": creation.get(tier, 0) for tier in ("5m", "1h", "24h")
        }
    return None if out == original else out


def _capped(split: Split, prompt_tokens: Any) -> tuple[int, dict[str, int]]:
    creation = {tier.value: n for tier, n in split.creation.items()}
    total = sum(creation.values())
    if not is_count(prompt_tokens):
        return split.read, creation
    prompted = int(prompt_tokens)
    if total > prompted:
        return 0, {}
    return min(split.read, prompted - total), creation


def _check_json_body(raw: bytes, rule: usage.UsageRule) -> None:
    edit = usage.edit_json_body(raw, rule)
    try:
        doc = parse(raw)
    except NotJson:
        if edit.body is not raw:
            raise Violation("a body that is not JSON was edited") from None
        return
    if not isinstance(doc, Obj) or not isinstance(doc.last("usage"), Obj):
        if edit.body is not raw:
            raise Violation("a body without a usage object was edited")
        return
    expected = expected_usage(doc.last("usage"), rule)
    if expected is None:
        if edit.body is not raw:
            raise Violation("a body with nothing to change was copied or changed")
        return
    edited = parse(edit.body)
    if not isinstance(edited, Obj):
        raise Violation("an edited body is not a JSON object")
    _same_but_usage(doc, edited, expected)


def _request_target(dialect: Dialect) -> Callable[[bytes], None]:
    return functools.partial(check_request, dialect)


TARGETS: dict[str, Callable[[bytes], None]] = {
    **{f"request:{name}": _request_target(dialect) for name, dialect in DIALECTS.items()},
    "sse": check_sse,
}
