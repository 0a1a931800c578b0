"""Incremental SSE framing and the one edit it allows: the usage of usage-bearing frames.

A sans-IO core: bytes go in through ``SseStream.feed``, complete events come out as the bytes
received; "need more data" is an empty list. ``flush`` at end of stream hands back the rest.

Rules:
* every byte fed comes out exactly once, in order and unchanged, in the ``raw`` of an event
  returned by ``feed`` or ``flush`` (or in ``EventTooLarge.pending``); the only bytes that
  are ever rewritten are a usage-bearing frame's, inside its ``usage`` value, and only by
  ``edit_usage_event``: a payload written on several ``data:`` lines stays on several lines,
  and only the lines the ``usage`` value spans become one (see ``_replace_data``);
* framing does not depend on chunking: an event ends with its blank line, line endings
  ``\\n``, ``\\r\\n`` and ``\\r`` mixed freely; a blank line that ends in ``\\r`` at the end of
  the data waits for the next byte, which may make it ``\\r\\n``;
* an event is JSON-parsed only when its bytes contain ``"error"`` or ``[DONE]``, or
  ``"usage"`` other than as ``"usage":null``; ``passes_whole`` says when a chunk of whole
  events cannot matter at all (then it need not be fed);
* what a parsed event means is the API's ``EventGrammar``: an error (``Kind.ERROR``), a
  usage-bearing frame that waits for the classification (``Kind.FINAL``) or never waits
  (``Kind.USAGE``), the event that completes the answer (``Kind.STOP``) or nothing; the
  grammar also names the bytes that make an event worth parsing besides a non-null
  ``usage``, ``"error"`` and ``[DONE]``, and edits a usage-bearing frame's data;
* a grammar with completing kinds (``EventGrammar.completing``) makes the stream complete
  only once one of them was seen; without any, every stream is complete;
* an event longer than ``MAX_EVENT_BYTES`` raises ``EventTooLarge``; from then on the stream
  passes every chunk through as one plain event, unframed and unclassified.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from extproc.core import spans
from extproc.core.errors import UpstreamFormatError
from extproc.core.usage import UsageRule, parse_object

MAX_EVENT_BYTES = 64 * 1024

_CR = 0x0D
_EOL = re.compile(rb"\r\n|\r|\n")
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n|\Z)")
_USAGE_KEY = b'"usage"'
_USAGE_NULLS = (b'"usage":null', b'"usage": null')
_LOOKBACK = 3  # a blank line is at most 4 bytes; resume its search this far before the end


class Kind(enum.Enum):
    """What an event means to the accounting."""

    PLAIN = "plain"
    USAGE = "usage"
    FINAL = "final"
    ERROR = "error"
    DONE = "done"
    STOP = "stop"


USAGE_KINDS = frozenset({Kind.USAGE, Kind.FINAL})


class EventGrammar(Protocol):
    """What one API's stream events mean (see the module rules)."""

    @property
    def triggers(self) -> tuple[bytes, ...]:
        """Bytes that make an event worth parsing, besides a usage, an error or ``[DONE]``."""
        ...

    @property
    def completing(self) -> frozenset[Kind]:
        """The kinds that complete the answer; empty when any stream is complete."""
        ...

    def kind(self, doc: dict[str, Any]) -> Kind:
        """What the event whose data is ``doc`` means."""
        ...

    def edit(self, text: str, rule: UsageRule) -> str | None:
        """A usage-bearing frame's data with ``rule`` applied; ``None`` when unchanged.

        Raises ``ValueError`` when the data is not a JSON object.
        """
        ...


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One event exactly as received, blank line included, and its kind."""

    raw: bytes
    kind: Kind = Kind.PLAIN


@dataclass(frozen=True, slots=True)
class StreamFacts:
    """What the stream showed so far, for the commit verdict."""

    usage_seen: bool
    error_seen: bool
    done_seen: bool
    oversized: bool
    completed: bool = True


class EventTooLarge(UpstreamFormatError):
    """An event exceeded ``MAX_EVENT_BYTES``.

    The caller forwards ``pending`` (every byte fed and not yet returned) unchanged, keeps
    forwarding later chunks unchanged (``feed`` now returns each as one plain event), edits
    nothing more and does not commit (the verdict's ``OVERSIZED_EVENT``).
    """

    def __init__(self, size: int, limit: int, pending: bytes) -> None:
        super().__init__(f"SSE event of at least {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.pending = pending


class SseStream:
    """Frames one response body into events and classifies them; see the module rules.

    ``final_usage`` is the upstream's usage object of the last final frame edited, if any.
    """

    def __init__(self, grammar: EventGrammar, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._grammar = grammar
        self._triggers = grammar.triggers
        self._buf = bytearray()
        self._scan = 0
        self._max = max_event_bytes
        self._usage_seen = False
        self._error_seen = False
        self._done_seen = False
        self._oversized = False
        self.final_usage: Mapping[str, Any] | None = None
        self._completed = not grammar.completing

    @property
    def facts(self) -> StreamFacts:
        return StreamFacts(
            self._usage_seen, self._error_seen, self._done_seen, self._oversized, self._completed
        )

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Complete events so far; an empty list means more data is needed."""
        if self._oversized:
            return [SseEvent(chunk)] if chunk else []
        data = self._pending(chunk)
        ends = _frame(data, self._scan)
        if ends and ends[-1] == len(data) and data[-1] == _CR:
            ends.pop()  # its blank line may yet become "\r\n"
        self._check_size(data, ends)
        return self._take(data, ends)

    def passes_whole(self, chunk: bytes) -> bool:
        """Whether ``chunk`` is whole events that cannot matter, so it need not be framed.

        Nothing held, no byte that could start a usage, error or ``[DONE]`` frame, and the
        chunk ends with a blank line (``\\n\\n``): a caller may pass it on as it is (a few
        byte scans instead of the framing regex, and no copy) without feeding it.
        """
        return (
            not self._buf
            and len(chunk) <= self._max
            and chunk.endswith(b"\n\n")
            and b"usage" not in chunk
            and b"error" not in chunk
            and b"[DONE]" not in chunk
            and not (self._triggers and self._has_trigger(chunk))
        )

    def _has_trigger(self, data: bytes | bytearray) -> bool:
        return any(trigger in data for trigger in self._triggers)

    def flush(self) -> list[SseEvent]:
        """At end of stream: the held events, then any unterminated rest as a plain event.

        The rest is not classified: SSE clients drop an event that never saw its blank line.
        """
        events = self._take(self._buf, _frame(self._buf, self._scan))
        if self._buf:
            events.append(SseEvent(bytes(self._buf)))
            self._buf.clear()
        self._scan = 0
        return events

    def edit_usage_event(self, event: SseEvent, rule: UsageRule) -> bytes:
        """A usage-bearing frame's bytes with ``rule`` applied to its usage."""
        if event.kind not in USAGE_KINDS:
            raise ValueError(f"not a usage-bearing frame: {event.kind.value} event")
        payload = _data_payload(event.raw)
        if payload is None:
            raise ValueError("the usage frame carries no JSON object")
        if event.kind is Kind.FINAL:
            self.final_usage = _usage_object(parse_object(payload))
        edited = self._grammar.edit(spans.decode(payload), rule)
        if edited is None:
            return event.raw
        return _replace_data(event.raw, spans.encode(edited))

    def _pending(self, chunk: bytes) -> bytes | bytearray:
        """The bytes to frame: the chunk itself when nothing is held (no copy), else the buffer."""
        if not self._buf:
            return chunk
        self._buf += chunk
        return self._buf

    def _check_size(self, data: bytes | bytearray, ends: list[int]) -> None:
        if len(data) <= self._max:
            return  # no event in it can be larger
        starts = [0, *ends]
        size = max(b - a for a, b in zip(starts, [*ends, len(data)], strict=True))
        if size > self._max:
            pending = bytes(data)
            self._buf.clear()
            self._oversized = True
            raise EventTooLarge(size, self._max, pending)

    def _take(self, data: bytes | bytearray, ends: list[int]) -> list[SseEvent]:
        """Cut the framed events off ``data``, classify them and hold the rest."""
        events, start = [], 0
        for end in ends:
            raw = _cut(data, start, end)
            events.append(SseEvent(raw, self._classify(raw)))
            start = end
        self._hold(data, start)
        return events

    def _hold(self, data: bytes | bytearray, start: int) -> None:
        """Keep ``data[start:]``, the event still incomplete, for the next chunk."""
        if data is self._buf:
            del self._buf[:start]
        else:
            self._buf += memoryview(data)[start:]
        self._scan = max(0, len(self._buf) - _LOOKBACK)

    def _classify(self, raw: bytes) -> Kind:
        if not _may_matter(raw) and not (self._triggers and self._has_trigger(raw)):
            return Kind.PLAIN
        payload = _data_payload(raw)
        if payload == b"[DONE]":
            self._done_seen = True
            return Kind.DONE
        doc = None if payload is None else _parse(payload)
        if doc is None:
            return Kind.PLAIN
        kind = self._grammar.kind(doc)
        self._note(kind)
        return kind

    def _note(self, kind: Kind) -> None:
        if kind is Kind.ERROR:
            self._error_seen = True
        elif kind in USAGE_KINDS:
            self._usage_seen = True
        if kind in self._grammar.completing:
            self._completed = True


def _parse(payload: bytes) -> dict[str, Any] | None:
    """The payload as an object: orjson first, the lossless reader for what it refuses."""
    doc = parse_object(payload)
    if doc is not None:
        return doc
    try:
        value = spans.read(spans.decode(payload), spans.LEAF).value
    except spans.NotJson:
        return None
    return value if isinstance(value, dict) else None


def _usage_object(doc: dict[str, Any] | None) -> Mapping[str, Any] | None:
    """The usage object of an event: its own, or its response's or message's (as sent)."""
    if doc is None:
        return None
    for found in (doc, doc.get("response"), doc.get("message")):
        usage = found.get("usage") if isinstance(found, dict) else None
        if isinstance(usage, dict):
            return usage
    return None


def _may_matter(raw: bytes) -> bool:
    return b'"error"' in raw or b"[DONE]" in raw or _has_usage_key(raw)


def _cut(data: bytes | bytearray, start: int, end: int) -> bytes:
    """``data[start:end]`` as ``bytes`` with one copy at most (none for a whole ``bytes``)."""
    if isinstance(data, bytes):
        return data[start:end]
    with memoryview(data) as view:
        return bytes(view[start:end])


def _frame(data: bytes | bytearray, scan: int) -> list[int]:
    """End offsets of the complete events in ``data``; the first blank-line search from ``scan``."""
    ends, start = [], 0
    while start < len(data):
        end = _event_end(data, start, max(start, scan))
        if end is None:
            break
        ends.append(end)
        start = end
    return ends


def _event_end(buf: bytes | bytearray, start: int, scan: int) -> int | None:
    """Where the event at ``start`` ends, searching its blank line from ``scan``."""
    if buf[start] in b"\r\n":  # a blank line right at the start is an event of its own
        line = _EOL.match(buf, start)
        return None if line is None else line.end()
    blank = _BLANK_LINE.search(buf, scan)
    return None if blank is None else blank.end()


def _has_usage_key(raw: bytes) -> bool:
    """Whether ``raw`` has a ``"usage"`` key that is not plainly ``null``."""
    keys = raw.count(_USAGE_KEY)
    return keys > 0 and keys > sum(raw.count(null) for null in _USAGE_NULLS)


def _is_data_line(line: bytes) -> bool:
    return line.startswith(b"data:") or line == b"data"


def _data_value(line: bytes) -> bytes:
    """A data line's value: after ``data:`` and one optional space."""
    value = line[5:]
    return value[1:] if value.startswith(b" ") else value


def _data_payload(raw: bytes) -> bytes | None:
    """The event's data lines joined by ``\\n`` (SSE spec), or ``None`` without any."""
    values = [_data_value(line) for line in _EOL.split(raw) if _is_data_line(line)]
    if not values:
        return None
    return b"\n".join(values)


def _replace_data(raw: bytes, data: bytes) -> bytes:
    """``raw`` with its data lines carrying ``data``; every line the edit did not reach is kept.

    The edit only ever joins lines (the new usage is written on one line): the data lines from
    the first changed one to the last one it swallowed become one line, in the last one's place,
    with the first one's ``data:`` prefix and the last one's line ending, so no line ending
    meets a different neighbour (a ``\\r`` never runs into a ``\\n``); every other line keeps
    its bytes and order.
    """
    lines = list(_LINE.finditer(raw))
    at = [i for i, line in enumerate(lines) if _is_data_line(line.group(1))]
    old = [_data_value(lines[i].group(1)) for i in at]
    new = data.split(b"\n")
    changed = (k for k, (a, b) in enumerate(zip(old, new, strict=False)) if a != b)
    first = next(changed, len(new) - 1)
    last = first + len(old) - len(new)
    parts = [line.group(0) for line in lines]
    prefix = b"data: " if lines[at[first]].group(1).startswith(b"data: ") else b"data:"
    for k in range(first, last):
        parts[at[k]] = b""
    parts[at[last]] = prefix + new[first] + lines[at[last]].group(2)
    return b"".join(parts)
