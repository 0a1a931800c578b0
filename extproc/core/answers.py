"""The response body as a session edits it: an SSE stream frame by frame, or a whole JSON answer.

Rules:
* SSE bytes come out exactly once and in order; only usage-bearing frames are rewritten (with
  the rule of the moment), and a partial event is held until it completes or the stream ends;
* the first *final* usage frame waits for the classification, unless events before it wait in
  the same chunk: those go out first and the frame is held for the next message; at the end
  of the stream nothing can be held, so the frame waits there;
* a chunk that cannot hold a usage, error or ``[DONE]`` frame, with nothing held before it,
  passes as it is without being framed (``SseStream.passes_whole``);
* a streamed answer is SSE unless its first bytes open a JSON document (``looks_like_sse``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extproc.core import sse, usage
from extproc.core.sse import EventGrammar, Kind, SseEvent, StreamFacts


class SseAnswer:
    """One streamed answer: frames in, the bytes to send for each chunk out."""

    def __init__(self, grammar: EventGrammar) -> None:
        self._stream = sse.SseStream(grammar)
        self._backlog: list[SseEvent] = []
        self._out = bytearray()
        self.chunk = b""
        self.ended = False

    @property
    def facts(self) -> StreamFacts:
        return self._stream.facts

    @property
    def final_usage(self) -> Mapping[str, Any] | None:
        """The upstream's usage object of the last final frame sent, if any."""
        return self._stream.final_usage

    def feed(self, chunk: bytes, end_of_stream: bool) -> None:
        """Take the next chunk; frames it into events to drain."""
        self.chunk, self.ended = chunk, end_of_stream
        if not self._backlog and self._stream.passes_whole(chunk):
            self._backlog.append(SseEvent(chunk))  # nothing in it can matter: not framed
        else:
            self._take(chunk)
        if end_of_stream:
            self._backlog += self._stream.flush()

    def _take(self, chunk: bytes) -> None:
        try:
            self._backlog += self._stream.feed(chunk)
        except sse.EventTooLarge as err:
            self._backlog.append(SseEvent(err.pending))

    def drain(self, known: bool, rule: usage.UsageRule) -> bytes | None:
        """The bytes to send for this chunk, or ``None``: the classification must come first.

        ``known`` says whether the classification is there; ``rule`` edits usage frames.
        """
        while self._backlog:
            event = self._backlog[0]
            if event.kind is Kind.FINAL and not known:
                if self._out and not self.ended:
                    break  # the tokens before it go out now; it waits for the next message
                return None
            self._out += self._emit(self._backlog.pop(0), rule)
        out, self._out = bytes(self._out), bytearray()
        return out

    def _emit(self, event: SseEvent, rule: usage.UsageRule) -> bytes:
        if event.kind not in sse.USAGE_KINDS:
            return event.raw
        return self._stream.edit_usage_event(event, rule)


def looks_like_sse(chunk: bytes) -> bool:
    """Whether a streamed answer's first bytes are SSE rather than a JSON document."""
    start = chunk.lstrip()[:1]
    return start != b"{" and start != b"["
