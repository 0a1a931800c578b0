"""The fake upstream's Anthropic Messages and OpenAI Responses answers, shaped as engines send them.

Shapes follow vLLM (0.23 two-key Messages usage; 0.33 with prompt-token details, where
``input_tokens`` excludes the engine's own cache read and write), SGLang (usage on
``message_start``, only ``output_tokens`` on ``message_delta``) and vLLM's Responses API
(``cached_tokens`` always filled, ``"usage": null`` until ``response.completed``). Frames are
``event: <name>`` plus one ``data:`` line, LF or CRLF; the fake's ``split`` cuts them anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from extproc.core import codec

if TYPE_CHECKING:
    from tests.fakes.upstream import Answer

CREATED = 1_700_000_000
MESSAGES_SUFFIX = "/v1/messages"
RESPONSES_SUFFIX = "/v1/responses"


def is_messages(path: str) -> bool:
    return path.endswith(MESSAGES_SUFFIX)


def is_responses(path: str) -> bool:
    return path.endswith(RESPONSES_SUFFIX)


def _event(name: str, value: dict[str, Any], nl: str) -> bytes:
    return f"event: {name}{nl}data: ".encode() + codec.dumps(value) + f"{nl}{nl}".encode()


def _words(text: str) -> list[str]:
    parts = text.split(" ")
    return [part if i == 0 else " " + part for i, part in enumerate(parts)]


# ---- Anthropic Messages ----


def messages_usage(answer: Answer, where: str) -> dict[str, Any]:
    """The usage an engine of ``answer.flavour`` sends on ``where``: start, delta or json."""
    prompt, cached = answer.prompt_tokens, answer.engine_cached or 0
    output = 0 if where == "start" else answer.completion_tokens
    if answer.flavour == "sglang":
        if where == "delta":
            return {"output_tokens": output}
        usage = {"input_tokens": prompt - cached, "output_tokens": output}
        return usage | ({"cache_read_input_tokens": cached} if cached else {})
    if answer.flavour == "details" and where != "start":
        written = answer.engine_written
        return {
            "input_tokens": prompt - cached - written,
            "output_tokens": output,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": cached,
        }
    return {"input_tokens": prompt, "output_tokens": output}


def _content(answer: Answer) -> list[dict[str, Any]]:
    if answer.tool_call is None:
        return [{"type": "text", "text": answer.content}]
    call = {"type": "tool_use", "id": f"toolu_{answer.tag or 'fake'}", "name": answer.tool_call}
    return [{"type": "text", "text": "Let me look that up."}, {**call, "input": answer.tool_input}]


def _message(model: str, answer: Answer, usage: dict[str, Any], done: bool) -> dict[str, Any]:
    stop = "tool_use" if answer.tool_call else "end_turn"
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _content(answer) if done else [],
        "stop_reason": stop if done else None,
        "stop_sequence": None,
        "usage": usage,
    }


def message(model: str, answer: Answer) -> dict[str, Any]:
    """A non-streaming Messages answer."""
    body = _message(model, answer, messages_usage(answer, "json"), done=True)
    if not answer.usage:
        del body["usage"]
    return body


def message_events(model: str, answer: Answer) -> list[bytes]:
    """A Messages stream; with ``error_frame`` it ends after an ``error`` event, as vLLM does."""
    nl = "\r\n" if answer.crlf else "\n"
    start = _message(model, answer, messages_usage(answer, "start"), done=False)
    events = [_event("message_start", {"type": "message_start", "message": start}, nl)]
    for index, block in enumerate(_content(answer)):
        events += _block_events(index, block, nl)
        if answer.error_frame:
            error = {"type": "internal_error", "message": "upstream failed mid-stream"}
            return [*events, _event("error", {"type": "error", "error": error}, nl)]
    stop = "tool_use" if answer.tool_call else "end_turn"
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
    }
    if answer.usage:
        delta["usage"] = messages_usage(answer, "delta")
    events.append(_event("message_delta", delta, nl))
    events.append(_event("message_stop", {"type": "message_stop"}, nl))
    return events


def _block_events(index: int, block: dict[str, Any], nl: str) -> list[bytes]:
    if block["type"] == "text":
        opened = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": w} for w in _words(block["text"])]
    else:
        opened = {**block, "input": {}}
        arguments = codec.dumps(block["input"]).decode()
        deltas = [{"type": "input_json_delta", "partial_json": arguments}]
    start = {"type": "content_block_start", "index": index, "content_block": opened}
    out = [_event("content_block_start", start, nl)]
    for delta in deltas:
        body = {"type": "content_block_delta", "index": index, "delta": delta}
        out.append(_event("content_block_delta", body, nl))
    out.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}, nl))
    return out


def messages_error(answer: Answer) -> dict[str, Any]:
    return {"type": "error", "error": {"type": "api_error", "message": "injected upstream error"}}


# ---- OpenAI Responses ----


def responses_usage(answer: Answer) -> dict[str, Any]:
    details: dict[str, Any] = {"cached_tokens": answer.engine_cached or 0}
    if answer.flavour == "details":
        details["cache_write_tokens"] = answer.engine_written
    return {
        "input_tokens": answer.prompt_tokens,
        "input_tokens_details": details,
        "output_tokens": answer.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def _output(answer: Answer) -> dict[str, Any]:
    part = {"type": "output_text", "text": answer.content, "annotations": []}
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [part],
    }


def response(model: str, answer: Answer, status: str = "completed") -> dict[str, Any]:
    """A Responses object (vLLM dumps it with its nulls)."""
    done = status != "in_progress"
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "model": model,
        "output": [_output(answer)] if done else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": responses_usage(answer) if done and answer.usage else None,
    }


def response_events(model: str, answer: Answer) -> list[bytes]:
    """A Responses stream; with ``error_frame`` a ``response.failed`` event ends it."""
    nl = "\r\n" if answer.crlf else "\n"
    seq = iter(range(1_000))

    def event(name: str, **fields: Any) -> bytes:
        return _event(name, {"type": name, **fields, "sequence_number": next(seq)}, nl)

    events = [
        event("response.created", response=response(model, answer, "in_progress")),
        event("response.in_progress", response=response(model, answer, "in_progress")),
    ]
    item = {**_output(answer), "status": "in_progress", "content": []}
    events.append(event("response.output_item.added", output_index=0, item=item))
    for word in _words(answer.content):
        ids = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}
        events.append(event("response.output_text.delta", **ids, delta=word, logprobs=[]))
    if answer.error_frame:
        failed = response(model, answer, "failed")
        failed |= {"usage": None, "error": {"code": "server_error", "message": "failed"}}
        return [*events, event("response.failed", response=failed)]
    events.append(event("response.output_item.done", output_index=0, item=_output(answer)))
    events.append(event("response.completed", response=response(model, answer)))
    return events
