"""Agent traffic through Envoy and the real server: tools, tool calls, automatic caching."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from extproc.core import codec
from tests.e2e.chat import (
    CHAT,
    DOCUMENT,
    SYSTEM,
    Answer,
    cache_fields,
    exchange,
    headers,
    marker,
    send,
    split_events,
    tag,
    text,
    usage_events,
    usage_of,
    wait_for_read,
)
from tests.fakes.upstream import HEADER
from tests.plugins.stack import RecordingTokenizer, Stack

pytestmark = pytest.mark.e2e

STREAMED = [pytest.param(False, id="json"), pytest.param(True, id="sse")]

LEDGER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "lookup_ledger",
        "description": "Look up the ledger entries of one account for a month.",
        "parameters": {
            "type": "object",
            "properties": {
                "account": {"type": "string", "description": "the account name"},
                "month": {"type": "string", "description": "YYYY-MM"},
                # A schema property that happens to be called cache_control is content.
                "cache_control": {"type": "string", "description": "how to cache the answer"},
            },
            "required": ["account", "month"],
        },
    },
}


def _tokens(stack: Stack, *texts: str) -> int:
    if stack.tokenizer is None:
        pytest.skip("needs the suite's own tokenizer to know the real counts")
    return sum(stack.tokenizer.count("demo", list(texts)))


def _canonical(value: Any) -> str:
    """A tool entry's or tool call's segment: compact JSON, keys sorted, without its marker."""
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "cache_control"}
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _call(call_id: str, account: str) -> dict[str, Any]:
    arguments = codec.dumps({"account": account, "month": "2026-01"}).decode()
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "lookup_ledger", "arguments": arguments},
    }


def _round(call_id: str, account: str, result: str) -> tuple[list[dict[str, Any]], str, str]:
    """One tool round: the assistant's call and the tool's result (marked), and their segments."""
    call = _call(call_id, account)
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": [text(result, marker())]},
    ]
    return messages, _canonical(call), result


def _until_read(stack: Stack, body: dict[str, Any], key: str, tokens: int) -> None:
    """Repeat ``body`` until it reads ``tokens`` (its own commit has landed)."""
    streamed = body.get("stream") is True
    read = None
    for _ in range(50):
        read = usage_of(send(stack, body, key), streamed).get("cache_read_input_tokens")
        if read == tokens:
            return
        time.sleep(0.1)
    raise AssertionError(f"read {read}, never {tokens}")


def _unmark(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same history with the markers of earlier turns moved away (agents mark the tip)."""
    out = codec.loads(codec.dumps(messages))
    for message in out:
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            block.pop("cache_control", None)
    return out


@pytest.mark.parametrize("streamed", STREAMED)
def test_a_tool_loop_reads_each_previous_turn_with_its_tool_calls(
    stack: Stack, streamed: bool
) -> None:
    key = stack.new_key()
    tool = {**LEDGER_TOOL, "cache_control": marker("1h")}
    base = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What did we spend on travel and on rent in January?"},
    ]
    round1, call1, result1 = _round("call_1", "travel", "2026-01-09 travel 612.40")
    round2, call2, result2 = _round("call_2", "rent", "2026-01-03 office rent 4,200.00")
    final = [
        {"role": "assistant", "content": "Travel was 612.40 and rent 4,200.00."},
        {"role": "user", "content": [text("And what was the total?", marker())]},
    ]
    turns = [base + round1, _unmark(base + round1) + round2]
    turns.append(_unmark(turns[1]) + final)
    tool_tokens = _tokens(stack, _canonical(tool))
    prefix = tool_tokens + _tokens(stack, SYSTEM, base[1]["content"])

    first = prefix + _tokens(stack, call1, result1)
    second = _tokens(stack, call2, result2)
    third = _tokens(stack, final[0]["content"], final[1]["content"][0]["text"])
    usages = []
    for messages, total in zip(turns, (first, first + second, first + second + third), strict=True):
        body = {"model": "demo", "tools": [tool], "messages": messages, "stream": streamed}
        result = send(stack, body, key)
        forwarded = codec.loads(result.upstream_body or b"")
        assert forwarded["tools"] == [LEDGER_TOOL]  # the schema's cache_control survives
        assert b'"cache_control":{' not in codec.dumps(forwarded["messages"])
        usages.append(usage_of(result, streamed))
        _until_read(stack, body, key, total)  # the commit has landed before the next turn

    expected = [
        {"read": 0, "created": first, "1h": tool_tokens, "5m": first - tool_tokens},
        {"read": first, "created": second, "1h": 0, "5m": second},
        {"read": first + second, "created": third, "1h": 0, "5m": third},
    ]
    seen = [{k: cache_fields(u)[k] for k in ("read", "created", "1h", "5m")} for u in usages]
    assert seen == expected


def _conversation(turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i}: {DOCUMENT[: 40 + 9 * i]}"})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": f"Answer {i}: noted, entry {i}."})
    return messages


@pytest.mark.parametrize("streamed", STREAMED)
def test_automatic_caching_follows_a_growing_conversation(stack: Stack, streamed: bool) -> None:
    key = stack.new_key()
    previous = 0
    for turns in (1, 2, 3):
        messages = _conversation(turns)
        body = {
            "model": "demo",
            "messages": messages,
            "cache_control": {"type": "ephemeral"},
            "stream": streamed,
        }
        result = send(stack, body, key)
        assert "cache_control" not in codec.loads(result.upstream_body or b"")
        total = _tokens(stack, *(m["content"] for m in messages))
        assert cache_fields(usage_of(result, streamed)) == {
            "read": previous,
            "created": total - previous,
            "cached_tokens": previous,
            "5m": total - previous,
            "1h": 0,
            "24h": 0,
        }
        _until_read(stack, body, key, total)
        previous = total


def _param_request(question: str) -> dict[str, Any]:
    return {
        "model": "demo",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ],
    }


def test_the_query_parameter_asks_for_automatic_caching_and_leaves_the_path(
    stack: Stack,
) -> None:
    body = _param_request("Which entries are over 1,000?")
    answer = Answer(tag=tag())
    path = CHAT + "?api-version=2&cacheBreakpoint=lastUserMessage&trace=on"
    result = exchange(stack, body, stack.new_key(), answer, path=path)

    assert result.status == 200, result.body
    (record,) = stack.records(answer.tag)
    assert record.target == CHAT + "?api-version=2&trace=on"
    total = _tokens(stack, SYSTEM, body["messages"][1]["content"])
    usage = cache_fields(usage_of(result, streamed=False))
    assert (usage["created"], usage["1h"], usage["5m"]) == (total, total, 0)


def test_the_query_parameter_alone_leaves_no_question_mark(stack: Stack) -> None:
    answer = Answer(tag=tag())
    path = CHAT + "?cacheBreakpoint=lastUserMessage"
    exchange(stack, _param_request("Any entries in February?"), stack.new_key(), answer, path)

    (record,) = stack.records(answer.tag)
    assert record.target == CHAT


def test_the_body_wins_over_the_query_parameter(stack: Stack) -> None:
    body = {**_param_request("Which entries are under 500?"), "cache_control": marker("5m")}
    path = CHAT + "?cacheBreakpoint=lastUserMessage"
    result = exchange(stack, body, stack.new_key(), path=path)

    usage = cache_fields(usage_of(result, streamed=False))
    assert usage["1h"] == 0
    assert usage["5m"] == usage["created"] > 0


@pytest.mark.parametrize(
    ("query", "value"),
    [
        pytest.param("cacheBreakpoint=lastusermessage", "lastusermessage", id="case-matters"),
        pytest.param("cacheBreakpoint=", "", id="empty"),
        pytest.param("cacheBreakpoint=last%55serMessage", "last%55serMessage", id="not-decoded"),
        pytest.param("cacheBreakpoint=x&cacheBreakpoint=lastUserMessage", "x", id="first-decides"),
    ],
)
def test_a_bad_query_parameter_gets_the_400(stack: Stack, query: str, value: str) -> None:
    result = exchange(stack, _param_request("hi"), stack.new_key(), path=f"{CHAT}?{query}")

    assert result.status == 400
    assert result.json() == {
        "error": {
            "message": f'invalid cacheBreakpoint value "{value}"; supported values: '
            '"lastUserMessage"',
            "type": "invalid_request_error",
            "code": "invalid_cache_breakpoint",
            "param": "cacheBreakpoint",
        }
    }
    assert result.upstream_body is None


AUTOMATIC_REJECTIONS = [
    pytest.param(
        [text("a"), text("b", marker("5m"))],
        marker("1h"),
        "top-level cache_control ttl conflicts with the explicit cache_control on the last block",
        id="conflict",
    ),
    pytest.param(
        [text(f"part {i}", marker()) for i in range(4)] + [text("tail")],
        marker(),
        "no breakpoint slot left for automatic caching (all 4 used by explicit markers)",
        id="no-slot",
    ),
    pytest.param(
        [text(f"part {i}", marker()) for i in range(5)],
        marker(),
        "too many cache_control breakpoints (max 4)",
        id="count-first",
    ),
]


@pytest.mark.parametrize(("blocks", "top", "message"), AUTOMATIC_REJECTIONS)
def test_automatic_caching_rejections(
    stack: Stack, blocks: list[dict[str, Any]], top: dict[str, Any], message: str
) -> None:
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": blocks}],
        "cache_control": top,
    }
    result = exchange(stack, body, stack.new_key())

    assert result.status == 400
    assert result.json()["error"] == {
        "message": message,
        "type": "invalid_request_error",
        "code": "invalid_cache_control",
        "param": "cache_control",
    }
    assert result.upstream_body is None


def test_markers_on_tools_and_tool_calls_count_toward_the_cap(stack: Stack) -> None:
    tools = [{**LEDGER_TOOL, "cache_control": marker()} for _ in range(3)]
    calls = [{**_call("c1", "a"), "cache_control": marker()}, _call("c2", "b")]
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [text("calling", marker())], "tool_calls": calls},
    ]
    result = exchange(stack, {"model": "demo", "tools": tools, "messages": messages}, None)

    assert result.status == 400
    assert result.json()["error"]["message"] == "too many cache_control breakpoints (max 4)"


def test_a_marker_on_a_non_assistant_tool_call_is_stripped_unread(stack: Stack) -> None:
    bogus = {"type": "persistent"}  # would be refused on an assistant's tool call
    messages = [
        {"role": "user", "content": [text(SYSTEM, marker())], "cache_control": {"keep": "me"}},
        {
            "role": "tool",
            "tool_call_id": "c1",
            "content": "ok",
            "tool_calls": [{"x": 1, "cache_control": bogus}],
        },
    ]
    result = send(stack, {"model": "demo", "messages": messages}, stack.new_key())

    forwarded = codec.loads(result.upstream_body or b"")["messages"]
    assert forwarded[0]["cache_control"] == {"keep": "me"}  # on a message object: content
    assert forwarded[1]["tool_calls"] == [{"x": 1}]
    assert cache_fields(usage_of(result, streamed=False))["created"] == _tokens(stack, SYSTEM)


# ---- provider cache fields and the cap ----


def _scrubbed(usage: dict[str, Any]) -> None:
    for field in ("prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "cache_creation"):
        assert field not in usage
    assert usage.get("cache_read_input_tokens") is None
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


@pytest.mark.parametrize("streamed", STREAMED)
def test_provider_cache_fields_are_scrubbed_from_inactive_answers(
    stack: Stack, streamed: bool
) -> None:
    answer = Answer(tag=tag(), provider_fields=True, engine_cached=40)
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": streamed}
    result = exchange(stack, body, None, answer)  # no key: inactive

    usage = usage_of(result, streamed)
    _scrubbed(usage)
    assert usage["prompt_tokens"] == answer.prompt_tokens


@pytest.mark.parametrize("streamed", STREAMED)
def test_provider_cache_fields_are_replaced_on_active_answers(stack: Stack, streamed: bool) -> None:
    answer = Answer(tag=tag(), provider_fields=True, engine_cached=40)
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": [text(SYSTEM, marker())]}],
        "stream": streamed,
    }
    usage = usage_of(exchange(stack, body, stack.new_key(), answer), streamed)

    assert "prompt_cache_hit_tokens" not in usage
    assert "prompt_cache_miss_tokens" not in usage
    created = _tokens(stack, SYSTEM)
    assert cache_fields(usage) == {
        "read": 0,
        "created": created,
        "cached_tokens": 0,
        "5m": created,
        "1h": 0,
        "24h": 0,
    }


@pytest.mark.parametrize("streamed", STREAMED)
def test_an_answer_without_provider_fields_stays_byte_identical(
    stack: Stack, streamed: bool
) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": streamed}
    result = exchange(stack, body, None)

    assert result.status == 200
    assert result.body == result.upstream_sent


def test_the_split_never_exceeds_prompt_tokens(stack: Stack) -> None:
    key = stack.new_key()
    body = {"model": "demo", "messages": [{"role": "user", "content": [text(SYSTEM, marker())]}]}
    total = _tokens(stack, SYSTEM)

    tiny = Answer(tag=tag(), prompt_tokens=total - 1)
    assert cache_fields(usage_of(exchange(stack, body, key, tiny), streamed=False))["created"] == 0
    wait_for_read(stack, body, key)  # the index still recorded what was written

    short = Answer(tag=tag(), prompt_tokens=total - 5)
    usage = cache_fields(usage_of(exchange(stack, body, key, short), streamed=False))
    assert (usage["read"], usage["created"], usage["cached_tokens"]) == (total - 5, 0, total - 5)


# ---- continuous usage stats: usage on every chunk ----


@pytest.fixture
def held_tokenizer(stack: Stack) -> Iterator[RecordingTokenizer]:
    if stack.tokenizer is None:
        pytest.skip("needs the suite's own tokenizer service to hold it")
    stack.tokenizer.gate.clear()
    yield stack.tokenizer
    stack.tokenizer.gate.set()


# One frame a chunk: frames that reach the server together can only leave together.
PACED = Answer(tag="paced", chunk_delay_ms=20)


def test_continuous_usage_frames_never_hold_the_first_token(
    stack: Stack, held_tokenizer: RecordingTokenizer
) -> None:
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": [text(SYSTEM + " " + tag(), marker())]}],
        "stream": True,
        "stream_options": {"continuous_usage_stats": True},
    }
    # The tokenizer is let go only once the client has the first usage-bearing chunk: had that
    # chunk waited for the classification, it would come only at the deadline, inactive.
    received: list[bytes] = []
    with stack.client() as client:
        content = codec.dumps(body)
        request = client.build_request(
            "POST", CHAT, content=content, headers=headers(stack.new_key(), PACED)
        )
        response = client.send(request, stream=True)
        try:
            for chunk in response.iter_raw():
                received.append(chunk)
                if b'"usage"' in chunk:
                    held_tokenizer.gate.set()
        finally:
            response.close()
    events = split_events(b"".join(received))

    assert response.status_code == 200
    frames = list(usage_events(events))
    assert len(frames) >= 4  # role chunk, content chunks, the finish chunk, the final one
    final = [u for i, u in frames if _is_final(events[i])]
    assert len(final) == 2  # the finish chunk and the `choices: []` chunk
    assert all(u["cache_creation_input_tokens"] > 0 for u in final)


def _is_final(event: bytes) -> bool:
    value = codec.loads(event.split(b"data: ", 1)[1])
    choices = value.get("choices")
    return not choices or any(c.get("finish_reason") for c in choices)


# ---- the official client ----


def test_the_openai_client_with_tools_and_automatic_caching(stack: Stack) -> None:
    key = stack.new_key()
    messages: list[Any] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Look up January's travel spending."},
    ]
    client = openai.OpenAI(
        base_url=stack.url + "/v1",
        api_key=key,
        default_headers={HEADER: Answer(tag=tag()).encode()},
        max_retries=0,
        timeout=60.0,
    )
    with client:
        usages = []
        for _ in range(2):
            completion = client.chat.completions.create(
                model="demo",
                messages=messages,
                tools=[LEDGER_TOOL],
                extra_body={"cache_control": {"type": "ephemeral", "ttl": "1h"}},
            )
            assert completion.usage is not None
            usages.append(completion.usage)
            body = {
                "model": "demo",
                "tools": [LEDGER_TOOL],
                "messages": messages,
                "cache_control": marker("1h"),
            }
            wait_for_read(stack, body, key)

    total = _tokens(stack, _canonical(LEDGER_TOOL), SYSTEM, messages[1]["content"])
    first, second = (u.model_extra or {} for u in usages)
    assert (first["cache_read_input_tokens"], first["cache_creation_input_tokens"]) == (0, total)
    assert first["cache_creation"]["ephemeral_1h_input_tokens"] == total
    assert (second["cache_read_input_tokens"], second["cache_creation_input_tokens"]) == (total, 0)
    assert usages[1].prompt_tokens_details is not None
    assert usages[1].prompt_tokens_details.cached_tokens == total


# ---- telemetry blocks (stripped by default) ----

BILLING = "x-anthropic-billing-header: cc_version=2.1.3; cc_entrypoint=cli; cch={nonce};"


def telemetry_request(nonce: str) -> dict[str, Any]:
    return {
        "model": "demo",
        "messages": [
            {
                "role": "system",
                "content": [
                    text("  " + BILLING.format(nonce=nonce)),
                    text(SYSTEM, marker()),
                ],
            },
            {"role": "user", "content": "hi"},
        ],
    }


def test_telemetry_blocks_are_left_out_and_removed(stack: Stack) -> None:
    key = stack.new_key()
    first = send(stack, telemetry_request(tag()), key)
    forwarded = codec.loads(first.upstream_body or b"")
    assert forwarded["messages"][0]["content"] == [{"type": "text", "text": SYSTEM}]
    created = _tokens(stack, SYSTEM)
    assert cache_fields(usage_of(first, streamed=False))["created"] == created

    # Another nonce on every request: the billing block never changes the prefix.
    _until_read(stack, telemetry_request(tag()), key, created)


# ---- bodies only a lossless reader reads ----

HOSTILE = [
    pytest.param(b'"n":1180591620717411303424', id="integer-beyond-64-bits"),
    pytest.param(b'"x":1e400,"y":-1e400', id="beyond-double"),
    pytest.param(b'"s":"\\ud800 lone"', id="escaped-lone-surrogate"),
    pytest.param(b'"d":' + b"[" * 1500 + b"]" * 1500, id="deeper-than-orjson"),
    pytest.param(b'"k":1,"k":2', id="duplicate-keys"),
]
CUT = b',"cache_control":{"type":"ephemeral"}'


@pytest.mark.parametrize("member", HOSTILE)
def test_hostile_values_reach_the_upstream_as_sent_and_markers_never(
    stack: Stack, member: bytes
) -> None:
    raw = (
        b'{"model":"demo",'
        + member
        + b',"messages":[{"role":"user","content":[{"type":"text","text":"'
        + SYSTEM.encode()
        + b'"'
        + CUT
        + b"}]}]}"
    )
    result = exchange(stack, raw, stack.new_key())

    assert result.upstream_body == raw.replace(CUT, b"")
