"""The demo upstream's Anthropic Messages and OpenAI Responses answers (the same canned reply).

Shapes follow the engines the sidecar fronts: Messages as vLLM sends it (``message_start``
with the whole prompt as ``input_tokens``, the final counts on ``message_delta``, then
``message_stop``; no ``[DONE]``), Responses as vLLM's (``"usage": null`` until the final
``response.completed``). ``input_tokens`` counts every block's text (the canonical JSON of
tools, tool calls and tool results, nothing for images) with the demo's counter, plus the
template overhead per message.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from extproc.core import codec

if TYPE_CHECKING:
    from extproc.devtools.upstream import Completion

TokenCounter = Callable[[str], int]
TOKENS_PER_MESSAGE = 4
TOKENS_FOR_REPLY = 3


def block_texts(value: Any) -> Iterator[str]:
    """What of a content value is counted: a string, or each block's text (else its JSON)."""
    if isinstance(value, str):
        yield value
        return
    for block in value if isinstance(value, list) else []:
        if not isinstance(block, dict) or block.get("type") in ("image", "document", "input_image"):
            continue
        text = block.get("text", block.get("thinking"))
        yield text if isinstance(text, str) else codec.canonical(block).decode()


def _tools(body: dict[str, Any]) -> Iterator[str]:
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else []:
        yield codec.canonical(tool).decode()


def messages_prompt(body: dict[str, Any], count: TokenCounter) -> int:
    """``input_tokens`` of a Messages request."""
    texts = [*_tools(body), *block_texts(body.get("system"))]
    for message in body["messages"]:
        if isinstance(message, dict):
            texts += block_texts(message.get("content"))
    overhead = TOKENS_PER_MESSAGE * (len(body["messages"]) + 1) + TOKENS_FOR_REPLY
    return sum(count(t) for t in texts) + overhead


def responses_prompt(body: dict[str, Any], count: TokenCounter) -> int:
    """``input_tokens`` of a Responses request."""
    texts = [*_tools(body), *block_texts(body.get("instructions"))]
    items = body["input"] if isinstance(body["input"], list) else [body["input"]]
    for item in items:
        if isinstance(item, dict) and "content" in item:
            texts += block_texts(item["content"])
        else:
            texts += (
                block_texts(item) if isinstance(item, str) else [codec.canonical(item).decode()]
            )
    return sum(count(t) for t in texts) + TOKENS_PER_MESSAGE * len(items) + TOKENS_FOR_REPLY


def messages_problem(body: Any) -> str | None:
    """Why ``body`` is not a Messages request, or ``None``."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return "messages: Field required"
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    return None


def responses_problem(body: Any) -> str | None:
    """Why ``body`` is not a Responses request, or ``None``."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "'model' is required and must be a string"
    if not isinstance(body.get("input"), str | list):
        return "'input' is required and must be a string or an array"
    return None


def anthropic_error(message: str) -> bytes:
    """Anthropic's error envelope."""
    return codec.dumps(
        {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    )


# ---- Messages ----


def _message(
    done: Completion, usage: dict[str, int], content: list[Any], stop: str | None
) -> dict[str, Any]:
    return {
        "id": done.id.replace("chatcmpl-", "msg_"),
        "type": "message",
        "role": "assistant",
        "model": done.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }


def _stop_reason(done: Completion) -> str:
    return "max_tokens" if done.finish_reason == "length" else "end_turn"


def message_json(done: Completion) -> dict[str, Any]:
    """The non-streaming Messages answer."""
    usage = {
        "input_tokens": done.usage["prompt_tokens"],
        "output_tokens": done.usage["completion_tokens"],
    }
    return _message(done, usage, [{"type": "text", "text": done.text}], _stop_reason(done))


def _event(name: str, value: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + codec.dumps({"type": name, **value}) + b"\n\n"


def message_events(done: Completion) -> Iterator[bytes]:
    """The SSE events of a streamed Messages answer."""
    start = {"input_tokens": done.usage["prompt_tokens"], "output_tokens": 0}
    yield _event("message_start", {"message": _message(done, start, [], None)})
    yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    for piece in done.pieces:
        yield _event(
            "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}}
        )
    yield _event("content_block_stop", {"index": 0})
    usage = {
        "input_tokens": done.usage["prompt_tokens"],
        "output_tokens": done.usage["completion_tokens"],
    }
    delta = {"stop_reason": _stop_reason(done), "stop_sequence": None}
    yield _event("message_delta", {"delta": delta, "usage": usage})
    yield _event("message_stop", {})


# ---- Responses ----


def _output(done: Completion) -> dict[str, Any]:
    part = {"type": "output_text", "text": done.text, "annotations": []}
    return {"id": "msg_" + done.id[-24:], "type": "message", "role": "assistant",
            "status": "completed", "content": [part]}  # fmt: skip


def response_json(done: Completion, status: str = "completed") -> dict[str, Any]:
    """The Responses object (``in_progress``: no output and no usage yet)."""
    finished = status != "in_progress"
    usage = {
        "input_tokens": done.usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": done.usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": done.usage["total_tokens"],
    }
    return {
        "id": done.id.replace("chatcmpl-", "resp_"),
        "object": "response",
        "created_at": done.created,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "model": done.model,
        "output": [_output(done)] if finished else [],
        "usage": usage if finished else None,
    }


def response_events(done: Completion) -> Iterator[bytes]:
    """The SSE events of a streamed Responses answer, numbered in order."""
    seq = itertools.count()
    ids = {"item_id": _output(done)["id"], "output_index": 0, "content_index": 0}
    yield _event(
        "response.created",
        {"response": response_json(done, "in_progress"), "sequence_number": next(seq)},
    )
    yield _event(
        "response.in_progress",
        {"response": response_json(done, "in_progress"), "sequence_number": next(seq)},
    )
    for piece in done.pieces:
        yield _event(
            "response.output_text.delta", {**ids, "delta": piece, "sequence_number": next(seq)}
        )
    yield _event(
        "response.output_text.done", {**ids, "text": done.text, "sequence_number": next(seq)}
    )
    yield _event(
        "response.completed", {"response": response_json(done), "sequence_number": next(seq)}
    )
