"""Request builders and SSE helpers shared by the end-to-end tests."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from extproc.core import codec
from tests.fakes.upstream import HEADER, Answer
from tests.plugins.stack import Stack

CHAT = "/v1/chat/completions"
# Long enough to clear the e2e model's 16-token floor many times over.
SYSTEM = (
    "You are a meticulous assistant for the accounting department of a mid-sized company. "
    "Answer in plain English, cite the relevant ledger entries, never invent figures, and "
    "flag every assumption you make so that a reviewer can check it before month-end close."
)
DOCUMENT = (
    "Ledger excerpt: 2026-01-03 office rent 4,200.00; 2026-01-05 cloud hosting 1,318.27; "
    "2026-01-09 travel reimbursement 612.40; 2026-01-14 software licences 2,950.00; "
    "2026-01-21 catering for the quarterly review 486.15; 2026-01-28 equipment lease 1,075.00."
)
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def tag() -> str:
    return secrets.token_hex(6)


def marker(ttl: str | None = None) -> dict[str, Any]:
    return {"type": "ephemeral"} if ttl is None else {"type": "ephemeral", "ttl": ttl}


def text(value: str, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": value}
    if cache is not None:
        block["cache_control"] = cache
    return block


def cached_request(
    model: str = "demo", question: str = "What did we spend on travel?", **extra: Any
) -> dict[str, Any]:
    """A system prompt and a document, each a breakpoint (1h then 5m), and a question."""
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": [text(SYSTEM, marker("1h"))]},
            {"role": "user", "content": [text(DOCUMENT, marker("5m")), text(question)]},
        ],
        **extra,
    }


def headers(key: str | None, answer: Answer) -> dict[str, str]:
    out = {"content-type": "application/json", HEADER: answer.encode()}
    if key is not None:
        out["authorization"] = f"Bearer {key}"
    return out


def post(
    client: httpx.Client,
    body: dict[str, Any] | bytes,
    key: str | None,
    answer: Answer,
    path: str = CHAT,
) -> httpx.Response:
    content = body if isinstance(body, bytes) else codec.dumps(body)
    return client.post(path, content=content, headers=headers(key, answer))


def split_events(data: bytes) -> list[bytes]:
    """SSE events with their terminators, in order; a trailing partial event is kept as is."""
    events: list[bytes] = []
    start = 0
    for match in _EVENT_END.finditer(data):
        events.append(data[start : match.end()])
        start = match.end()
    if start < len(data):
        events.append(data[start:])
    return events


def event_json(event: bytes) -> Any:
    """The JSON of an event's ``data:`` line, or None for comments and ``[DONE]``."""
    for line in event.splitlines():
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            return None if payload == b"[DONE]" else codec.loads(payload)
    return None


def usage_events(events: list[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, event in enumerate(events):
        value = event_json(event)
        if isinstance(value, dict) and isinstance(value.get("usage"), dict):
            yield i, value["usage"]


def stream_usage(data: bytes) -> dict[str, Any]:
    found = list(usage_events(split_events(data)))
    assert len(found) == 1, data
    return found[0][1]


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request through the stack: what the client got and what the upstream saw."""

    status: int
    headers: httpx.Headers
    body: bytes
    upstream_body: bytes | None
    upstream_sent: bytes

    def json(self) -> Any:
        return codec.loads(self.body)


def exchange(
    stack: Stack,
    body: dict[str, Any] | bytes,
    key: str | None,
    answer: Answer | None = None,
    path: str = CHAT,
) -> Exchange:
    answer = answer or Answer(tag=tag())
    with stack.client() as client:
        response = post(client, body, key, answer, path)
    records = stack.records(answer.tag)
    assert len(records) <= 1, records
    record = records[0] if records else None
    return Exchange(
        status=response.status_code,
        headers=response.headers,
        body=response.content,
        upstream_body=record.body if record else None,
        upstream_sent=b"".join(record.sent) if record else b"",
    )


def stream(stack: Stack, body: dict[str, Any], key: str, answer: Answer | None = None) -> Exchange:
    return exchange(stack, {**body, "stream": True}, key, answer)


def cache_fields(usage: dict[str, Any]) -> dict[str, Any]:
    """The injected fields of a usage object (absent ones as None)."""
    details = usage.get("prompt_tokens_details") or {}
    creation = usage.get("cache_creation") or {}
    return {
        "read": usage.get("cache_read_input_tokens"),
        "created": usage.get("cache_creation_input_tokens"),
        "cached_tokens": details.get("cached_tokens"),
        "5m": creation.get("ephemeral_5m_input_tokens"),
        "1h": creation.get("ephemeral_1h_input_tokens"),
        "24h": creation.get("ephemeral_24h_input_tokens"),
    }


def usage_of(result: Exchange, streamed: bool) -> dict[str, Any]:
    if streamed:
        return stream_usage(result.body)
    found: dict[str, Any] = result.json()["usage"]
    return found


def send(stack: Stack, body: dict[str, Any], key: str, answer: Answer | None = None) -> Exchange:
    """One request, streamed when the body says so; asserts the upstream answered 200."""
    result = exchange(stack, body, key, answer)
    assert result.status == 200, result.body
    return result


def wait_for_read(
    stack: Stack, body: dict[str, Any], key: str, attempts: int = 50
) -> dict[str, Any]:
    """Repeat ``body`` until its usage shows a read (commits land after the response)."""
    streamed = body.get("stream") is True
    usage: dict[str, Any] = {}
    for _ in range(attempts):
        usage = usage_of(send(stack, body, key), streamed)
        if usage.get("cache_read_input_tokens"):
            return usage
        time.sleep(0.1)
    raise AssertionError(f"no cache read after {attempts} attempts: {usage}")


def barrier(stack: Stack, key: str) -> None:
    """Wait until a fresh commit of ``key`` is visible, so earlier commits would be too."""
    body = cached_request(question="barrier")
    body["messages"][0]["content"][0]["text"] = SYSTEM + " Barrier " + tag()
    wait_for_read(stack, body, key)


@dataclass(frozen=True, slots=True)
class Partial:
    """A streamed exchange that may have ended early: bytes seen and how it ended."""

    status: int
    body: bytes
    error: str | None


def stream_raw(
    stack: Stack,
    body: dict[str, Any],
    key: str | None,
    answer: Answer,
    hang_up_after: int | None = None,
    release_after: int | None = None,
) -> Partial:
    """Stream ``body``; with ``hang_up_after`` the client leaves after that many chunks.

    With ``release_after`` the client releases the upstream's hold (``Answer.hold_after``)
    once it has received that many chunks.
    """
    received: list[bytes] = []
    error: str | None = None
    with stack.client() as client:
        content = codec.dumps({**body, "stream": True})
        request = client.build_request("POST", CHAT, content=content, headers=headers(key, answer))
        response = client.send(request, stream=True)
        try:
            for chunk in response.iter_raw():
                received.append(chunk)
                if len(received) == release_after:
                    stack.release(answer.tag)
                if hang_up_after is not None and len(received) >= hang_up_after:
                    break
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        finally:
            response.close()
    return Partial(response.status_code, b"".join(received), error)
