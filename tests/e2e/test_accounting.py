"""Through Envoy and the real server: writes, reads, the 400s, and what passes untouched."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from extproc.core import codec
from extproc.core.model import RequestPolicy
from extproc.core.request import prepare
from tests.e2e.chat import (
    CHAT,
    DOCUMENT,
    SYSTEM,
    Answer,
    barrier,
    cache_fields,
    cached_request,
    event_json,
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
from tests.plugins.stack import IndexRow, Stack

pytestmark = pytest.mark.e2e


def prefix_hashes(body: dict[str, Any]) -> tuple[bytes, ...]:
    prepared = prepare(codec.dumps(body), RequestPolicy())
    assert prepared is not None
    return prepared.hashes


def _count(stack: Stack, *texts: str) -> tuple[int, ...]:
    if stack.tokenizer is None:
        pytest.skip("needs the suite's own tokenizer to know the real counts")
    return stack.tokenizer.count("demo", list(texts))


def _counts(stack: Stack) -> tuple[int, int]:
    system, document = _count(stack, SYSTEM, DOCUMENT)
    return system, document


def _without_markers(body: dict[str, Any]) -> dict[str, Any]:
    out = codec.loads(codec.dumps(body))
    for message in out["messages"]:
        for block in message["content"] if isinstance(message["content"], list) else []:
            block.pop("cache_control", None)
    return out


@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_first_request_writes_and_the_second_reads(stack: Stack, streamed: bool) -> None:
    system, document = _counts(stack)
    key = stack.new_key()
    body = cached_request(stream=streamed)

    first = usage_of(send(stack, body, key), streamed)
    second = wait_for_read(stack, body, key)

    assert first["prompt_tokens"] == second["prompt_tokens"] == Answer().prompt_tokens
    assert cache_fields(first) == {
        "read": 0,
        "created": system + document,
        "cached_tokens": 0,
        "5m": document,
        "1h": system,
        "24h": 0,
    }
    assert cache_fields(second) == {
        "read": system + document,
        "created": 0,
        "cached_tokens": system + document,
        "5m": 0,
        "1h": 0,
        "24h": 0,
    }


def test_a_longer_prompt_reads_the_prefix_and_writes_the_rest(stack: Stack) -> None:
    system, _ = _counts(stack)
    key = stack.new_key()
    short = {"model": "demo", "messages": [{"role": "system", "content": [text(SYSTEM, marker())]}]}
    send(stack, short, key)
    wait_for_read(stack, short, key)

    usage = usage_of(send(stack, cached_request(), key), streamed=False)

    assert usage["cache_read_input_tokens"] == system
    assert (
        usage["cache_creation"]["ephemeral_5m_input_tokens"] == usage["cache_creation_input_tokens"]
    )
    assert usage["cache_creation_input_tokens"] > 0


def test_principals_never_share_entries(stack: Stack) -> None:
    body = cached_request()
    owner = stack.new_key()
    send(stack, body, owner)
    wait_for_read(stack, body, owner)

    stranger = usage_of(send(stack, body, stack.new_key()), streamed=False)

    assert stranger["cache_read_input_tokens"] == 0
    assert stranger["cache_creation_input_tokens"] > 0


@pytest.mark.parametrize(
    "streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse-no-stream-options")]
)
def test_forwarded_body_has_no_markers_and_streams_carry_usage(
    stack: Stack, streamed: bool
) -> None:
    body = cached_request(stream=streamed, temperature=0.2)
    result = send(stack, body, stack.new_key())

    assert result.upstream_body is not None
    forwarded = codec.loads(result.upstream_body)
    expected = _without_markers(body)
    if streamed:
        expected["stream_options"] = {"include_usage": True}
    assert forwarded == expected
    assert b"cache_control" not in result.upstream_body


def test_stream_options_are_kept_and_include_usage_forced(stack: Stack) -> None:
    body = cached_request(stream=True, stream_options={"include_usage": False, "x": 1})
    result = send(stack, body, stack.new_key())

    assert result.upstream_body is not None
    assert codec.loads(result.upstream_body)["stream_options"] == {"include_usage": True, "x": 1}


SPLITS = [
    pytest.param(Answer(), id="one-frame-per-chunk"),
    # Small pauses so Envoy reads (and the server gets) the pieces as separate chunks.
    pytest.param(Answer(split="awkward", chunk_delay_ms=5), id="split-inside-data-and-usage"),
    pytest.param(
        Answer(split="awkward", crlf=True, chunk_delay_ms=5), id="crlf-split-between-cr-and-lf"
    ),
    pytest.param(Answer(split="bytes:7", crlf=True, chunk_delay_ms=1), id="seven-byte-chunks"),
    pytest.param(Answer(split="whole"), id="one-chunk"),
    pytest.param(Answer(sse_content_length=True), id="sse-with-content-length"),
]


@pytest.mark.parametrize("answer", SPLITS)
def test_stream_edits_only_the_usage_frame(stack: Stack, answer: Answer) -> None:
    answer = Answer(**{**_fields(answer), "tag": tag()})
    result = send(stack, cached_request(stream=True), stack.new_key(), answer)

    client, upstream = split_events(result.body), split_events(result.upstream_sent)
    assert len(client) == len(upstream)
    [(at, usage)] = list(usage_events(client))
    for i, (mine, theirs) in enumerate(zip(client, upstream, strict=True)):
        if i != at:
            assert mine == theirs, i
    edited, original = event_json(client[at]), event_json(upstream[at])
    assert {k: v for k, v in edited.items() if k != "usage"} == {
        k: v for k, v in original.items() if k != "usage"
    }
    assert {k: usage[k] for k in original["usage"]} == original["usage"]
    assert usage["cache_creation_input_tokens"] > 0
    assert client[at].endswith(b"\r\n\r\n" if answer.crlf else b"\n\n")


def _fields(answer: Answer) -> dict[str, Any]:
    return {f: getattr(answer, f) for f in Answer.__dataclass_fields__}


def test_json_answer_keeps_every_other_field(stack: Stack) -> None:
    result = send(stack, cached_request(), stack.new_key())

    edited, original = result.json(), codec.loads(result.upstream_sent)
    assert {k: v for k, v in edited.items() if k != "usage"} == {
        k: v for k, v in original.items() if k != "usage"
    }
    assert int(result.headers["content-length"]) == len(result.body)


MALFORMED = (
    'cache_control must be an object with a string "type": "ephemeral" '
    '(and an optional string "ttl")'
)
REJECTIONS = [
    pytest.param("not-an-object", MALFORMED, id="malformed"),
    pytest.param({"ttl": "5m"}, MALFORMED, id="type-missing"),
    pytest.param({"type": "ephemeral", "ttl": 5}, MALFORMED, id="ttl-not-string"),
    pytest.param(
        {"type": "persistent"},
        'unsupported cache_control type: "persistent" (only "ephemeral")',
        id="unsupported-type",
    ),
    pytest.param(
        {"type": "ephemeral", "ttl": "2h"}, 'invalid cache_control ttl: "2h"', id="invalid-ttl"
    ),
]


@pytest.mark.parametrize(("cache", "message"), REJECTIONS)
@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_bad_markers_get_a_400_and_never_reach_the_upstream(
    stack: Stack, cache: Any, message: str, streamed: bool
) -> None:
    body = {
        "model": "demo",
        "stream": streamed,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": cache}]}
        ],
    }
    result = exchange(stack, body, stack.new_key())

    _assert_rejected(result, message)


def test_a_disabled_tier_gets_a_400_naming_the_available_ones(stack: Stack) -> None:
    enabled = [t.strip() for t in stack.enabled_ttls.split(",")]
    disabled = [t for t in ("5m", "1h", "24h") if t not in enabled]
    if not disabled:
        pytest.skip("every tier is enabled on this stack")
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": [text("hi", marker(disabled[0]))]}],
    }
    result = exchange(stack, body, stack.new_key())

    available = ", ".join(t for t in ("5m", "1h", "24h") if t in enabled)
    _assert_rejected(
        result,
        f"cache_control ttl tier '{disabled[0]}' is not currently available; "
        f"available tiers: {available}",
    )


def test_too_many_breakpoints_get_a_400(stack: Stack) -> None:
    blocks = [text(f"part {i}", marker()) for i in range(5)]
    body = {"model": "demo", "messages": [{"role": "user", "content": blocks}]}
    _assert_rejected(
        exchange(stack, body, stack.new_key()), "too many cache_control breakpoints (max 4)"
    )


def test_bad_markers_are_rejected_even_without_a_key_or_enabled_model(stack: Stack) -> None:
    body = {
        "model": "demo-off",
        "messages": [{"role": "user", "content": [text("x", marker("2h"))]}],
    }
    _assert_rejected(exchange(stack, body, None), 'invalid cache_control ttl: "2h"')


def _assert_rejected(result: Any, message: str) -> None:
    assert result.status == 400, result.body
    assert result.headers["content-type"].startswith("application/json")
    error = result.json()["error"]
    assert error == {
        "message": message,
        "type": "invalid_request_error",
        "code": "invalid_cache_control",
        "param": "cache_control",
    }
    assert result.upstream_body is None


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"model": "demo", "messages": [', id="truncated-json"),
        pytest.param(b"model=demo&messages=hi", id="form-data"),
        pytest.param(b'["a", "json", "array"]', id="json-array"),
        pytest.param(b"", id="empty"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_forwarded_untouched(stack: Stack, raw: bytes) -> None:
    result = exchange(stack, raw, stack.new_key())

    assert result.upstream_body == raw
    assert result.status == 400  # the fake upstream's own answer
    assert result.body == result.upstream_sent


@pytest.mark.parametrize(
    ("model", "key"),
    [
        pytest.param("demo-off", True, id="model-not-enabled"),
        pytest.param("unknown-model", True, id="model-unknown-to-everyone"),
        pytest.param("demo", False, id="no-bearer-token"),
    ],
)
@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_inactive_requests_get_the_upstream_usage_untouched(
    stack: Stack, model: str, key: bool, streamed: bool
) -> None:
    body = cached_request(model=model, stream=streamed)
    result = send(stack, body, stack.new_key() if key else None)

    assert result.body == result.upstream_sent
    assert result.upstream_body is not None
    assert b"cache_control" not in result.upstream_body


ZERO_FIELDS = {"read": 0, "created": 0, "cached_tokens": 0, "5m": 0, "1h": 0, "24h": 0}


def test_a_prefix_below_the_model_floor_gets_zero_fields(stack: Stack) -> None:
    key = stack.new_key()
    body = cached_request(model="demo-floor")
    send(stack, body, key)
    usage = usage_of(send(stack, body, key), streamed=False)

    assert cache_fields(usage) == ZERO_FIELDS
    barrier(stack, key)  # a commit of the first request would be visible by now
    assert stack.entries(key, model="demo-floor") == {}


@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_no_markers_gets_zero_fields_on_an_enabled_model(stack: Stack, streamed: bool) -> None:
    body = {"model": "demo", "stream": streamed, "messages": [{"role": "user", "content": "hello"}]}
    result = send(stack, body, stack.new_key())
    usage = usage_of(result, streamed)

    assert cache_fields(usage) == ZERO_FIELDS
    assert usage["prompt_tokens"] == Answer().prompt_tokens
    if not streamed:
        assert result.upstream_body == codec.dumps(body)  # nothing to strip: forwarded as sent


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("POST", "/v1/embeddings", id="embeddings"),
        pytest.param("POST", "/v1/completions", id="legacy-completions"),
        pytest.param("GET", "/v1/models", id="models"),
        pytest.param("GET", CHAT, id="get-on-the-chat-path"),
        pytest.param("POST", CHAT + "/", id="trailing-slash"),
    ],
)
def test_other_routes_pass_untouched_and_never_reach_the_server(
    stack: Stack, method: str, path: str
) -> None:
    stat = "http.llm.ext_proc.extproc.streams_started"
    before = stack.envoy_stat(stat)
    body = codec.dumps(cached_request())
    answer = Answer(tag=tag())
    with stack.client() as client:
        response = client.request(
            method, path, content=body, headers={"x-fake-upstream": answer.encode()}
        )

    [record] = stack.records(answer.tag)
    assert response.status_code == 200
    assert record.body == body
    assert response.content == b"".join(record.sent)
    assert stack.envoy_stat(stat) == before


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/chat/completions", id="no-version"),
        pytest.param("/openai/v1/chat/completions", id="prefixed"),
        pytest.param(CHAT + "?api-version=2024-10-01", id="query-string"),
        pytest.param("/openai/v1/chat/completions?x=1&y=/chat", id="prefixed-with-query-string"),
        pytest.param("/chat/completions?x=1", id="no-version-with-query-string"),
    ],
)
def test_chat_path_variants_are_processed(stack: Stack, path: str) -> None:
    key = stack.new_key()
    result = exchange(stack, cached_request(), key, path=path)

    assert result.status == 200
    assert result.upstream_body is not None
    assert b"cache_control" not in result.upstream_body
    assert result.json()["usage"]["cache_creation_input_tokens"] > 0


# ---- the cache model through the real pipeline (DESIGN §3), read back from the index ----

# DESIGN §3: system "static system" then user "hi", hashed after block 0 and after block 1.
VECTOR_0 = bytes.fromhex("3f64b6de25662606fce3fdbfc38c06d90282a10f28a6a12496225051481cf3e2")
VECTOR_1 = bytes.fromhex("b063c46136d7e666f8ff6dfbb59370f23dd93a60e692faceb73da98351330939")
QUESTION = "What did we spend on travel?"


def _age(stack: Stack, key: str, seconds_left: int) -> None:
    """Move every entry of ``key``'s principal to expire ``seconds_left`` from now."""
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE prompt_cache_entries SET expires_at = now() + %s * interval '1 second'"
            " WHERE principal_id = %s",
            (seconds_left, stack.principal_of(key)),
        )


def _entries_after_commit(stack: Stack, key: str, count: int) -> dict[bytes, IndexRow]:
    """The principal's entries once at least ``count`` of them are committed."""
    entries: dict[bytes, IndexRow] = {}
    for _ in range(100):
        entries = stack.entries(key)
        if len(entries) >= count:
            return entries
        time.sleep(0.05)
    raise AssertionError(f"{len(entries)} entries committed, expected {count}")


def _static_system(system_marked: bool) -> dict[str, Any]:
    """DESIGN's example conversation, marked one way or the other, then a long marked block."""
    system: Any = [text("static system", marker("1h"))] if system_marked else "static system"
    user: Any = "hi" if system_marked else [text("hi", marker())]
    return {
        "model": "demo",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "user", "content": [text(DOCUMENT, marker())]},
        ],
    }


def test_index_entries_carry_the_reference_prefix_hashes(stack: Stack) -> None:
    by_user, by_system = stack.new_key(), stack.new_key()
    send(stack, _static_system(system_marked=False), by_user)
    send(stack, _static_system(system_marked=True), by_system)

    user_entries = _entries_after_commit(stack, by_user, 2)
    system_entries = _entries_after_commit(stack, by_system, 2)

    # A string content hashes as the text block it stands for; markers never enter the hash.
    assert VECTOR_1 in user_entries
    assert VECTOR_0 in system_entries
    [shared] = set(user_entries) & set(system_entries)
    assert user_entries[shared].tokens == system_entries[shared].tokens
    assert (user_entries[VECTOR_1].tier, system_entries[VECTOR_0].tier) == ("5m", "1h")


def test_the_same_content_with_other_markers_is_read(stack: Stack) -> None:
    key = stack.new_key()
    send(stack, _static_system(system_marked=False), key)
    entries = _entries_after_commit(stack, key, 2)

    usage = usage_of(send(stack, _static_system(system_marked=True), key), streamed=False)

    assert usage["cache_read_input_tokens"] == max(row.tokens for row in entries.values())
    assert usage["cache_creation_input_tokens"] == 0


def _conversation(*turns: dict[str, Any]) -> dict[str, Any]:
    body = cached_request(question=QUESTION)
    body["messages"] += list(turns)
    return body


def test_the_deepest_match_is_read_and_only_the_new_span_written(stack: Stack) -> None:
    system, document = _counts(stack)
    answer, follow_up = "Travel was 612.40.", "And the rent?"
    question, *rest = _count(stack, QUESTION, answer, follow_up)
    key = stack.new_key()
    send(stack, cached_request(question=QUESTION), key)
    _entries_after_commit(stack, key, 2)  # after the system prompt and after the document

    longer = _conversation(
        {"role": "assistant", "content": answer},
        {"role": "user", "content": [text(follow_up, marker("1h"))]},
    )
    usage = usage_of(send(stack, longer, key), streamed=False)

    assert cache_fields(usage) == {
        "read": system + document,
        "created": question + sum(rest),
        "cached_tokens": system + document,
        "5m": 0,
        "1h": question + sum(rest),
        "24h": 0,
    }
    entries = _entries_after_commit(stack, key, 3)
    deepest = prefix_hashes(longer)[-1]
    row = entries[deepest]
    assert (row.tokens, row.tier) == (system + document + question + sum(rest), "1h")


def test_a_read_slides_the_expiry_of_the_matched_entry_only(stack: Stack) -> None:
    """Once under 90% of its tier is left (``EXTPROC_REFRESH_DEBOUNCE_PCT``), a read slides it."""
    key = stack.new_key()
    body = cached_request()
    send(stack, body, key)
    hashes = prefix_hashes(body)
    system_hash, document_hash = hashes[0], hashes[1]
    _entries_after_commit(stack, key, 2)
    _age(stack, key, seconds_left=200)
    time.sleep(2.5)  # past the 2 s a worker answers a hit from memory: it asks PostgreSQL again
    before = stack.entries(key)

    assert usage_of(send(stack, body, key), streamed=False)["cache_read_input_tokens"] > 0

    for _ in range(100):
        after = stack.entries(key)
        if after[document_hash].expires_at > before[document_hash].expires_at:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the matched entry was not refreshed: {after}")
    assert 290 < after[document_hash].expires_in_s <= 300  # now + its own tier (5m)
    assert after[system_hash].expires_at == before[system_hash].expires_at  # not matched
    assert after[document_hash].tokens == before[document_hash].tokens


def _block(value: str, cache: Any) -> dict[str, Any]:
    return {"type": "text", "text": value, "cache_control": cache}


def test_four_breakpoints_each_become_an_entry_in_the_default_tier(stack: Stack) -> None:
    if "5m" not in stack.enabled_ttls:
        pytest.skip("the default tier of this stack is not known")
    parts = [f"{DOCUMENT} Part {i}." for i in range(4)]
    counts = _count(stack, *parts)
    key = stack.new_key()
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": [text(p, marker()) for p in parts]}],
    }

    result = send(stack, body, key)

    usage = usage_of(result, streamed=False)
    assert usage["cache_creation"]["ephemeral_5m_input_tokens"] == sum(counts)
    assert usage["cache_creation_input_tokens"] == sum(counts)
    assert b"cache_control" not in (result.upstream_body or b"cache_control")
    entries = _entries_after_commit(stack, key, 4)
    assert sorted(row.tokens for row in entries.values()) == [
        sum(counts[: i + 1]) for i in range(4)
    ]
    assert {row.tier for row in entries.values()} == {"5m"}


@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_a_null_marker_is_stripped_and_is_no_breakpoint(stack: Stack, streamed: bool) -> None:
    system, document = _counts(stack)
    key = stack.new_key()
    marked = [_block(SYSTEM, None), _block(DOCUMENT, marker("1h"))]
    body = {"model": "demo", "stream": streamed, "messages": [{"role": "user", "content": marked}]}

    result = send(stack, body, key)

    assert result.upstream_body is not None
    forwarded = codec.loads(result.upstream_body)["messages"][0]["content"]
    assert forwarded == [text(SYSTEM), text(DOCUMENT)]
    assert cache_fields(usage_of(result, streamed))["1h"] == system + document
    entries = _entries_after_commit(stack, key, 1)
    assert [row.tokens for row in entries.values()] == [system + document]


def test_only_null_markers_mean_no_markers(stack: Stack) -> None:
    key = stack.new_key()
    body = {"model": "demo", "messages": [{"role": "user", "content": [_block(SYSTEM, None)]}]}

    result = send(stack, body, key)

    assert cache_fields(usage_of(result, streamed=False)) == ZERO_FIELDS
    assert result.upstream_body is not None
    assert b"cache_control" not in result.upstream_body


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("bearer {key}", id="lower-case-scheme"),
        pytest.param("Bearer    {key}", id="spaces-after-the-scheme"),
        pytest.param("bearer \t{key}", id="tab-before-the-token"),
    ],
)
def test_bearer_spellings_name_the_same_principal(stack: Stack, authorization: str) -> None:
    key = stack.new_key()
    body = cached_request()
    send(stack, body, key)
    wait_for_read(stack, body, key)
    answer = Answer(tag=tag())
    with stack.client() as client:
        response = client.post(
            CHAT,
            content=codec.dumps(body),
            headers={**headers(None, answer), "authorization": authorization.format(key=key)},
        )

    assert response.status_code == 200
    assert response.json()["usage"]["cache_read_input_tokens"] > 0


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Basic dXNlcjpwYXNz", id="basic"),
        pytest.param("Bearer", id="no-token"),
        pytest.param("Token sk-e2e-abc", id="other-scheme"),
    ],
)
def test_no_bearer_token_leaves_the_answer_byte_identical(stack: Stack, authorization: str) -> None:
    answer = Answer(tag=tag())
    with stack.client() as client:
        response = client.post(
            CHAT,
            content=codec.dumps(cached_request()),
            headers={**headers(None, answer), "authorization": authorization},
        )
    [record] = stack.records(answer.tag)

    assert response.status_code == 200
    assert response.content == b"".join(record.sent)
    assert b"cache_control" not in record.body


# ---- what the upstream sends back: every byte kept but the cache fields (DESIGN §4.3) ----

UPSTREAM_USAGE = {
    "prompt_tokens": 900,
    "completion_tokens": 3,
    "total_tokens": 903,
    "prompt_tokens_details": {"cached_tokens": 640, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 1},
    "queue_time": 0.25,
}


def test_other_usage_keys_are_kept(stack: Stack) -> None:
    system, document = _counts(stack)
    completion = {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": UPSTREAM_USAGE,
        "system_fingerprint": "fp_raw",
    }
    raw = codec.dumps(completion).decode()
    result = send(stack, cached_request(), stack.new_key(), Answer(tag=tag(), raw=raw))

    edited = result.json()
    assert {k: v for k, v in edited.items() if k != "usage"} == {
        k: v for k, v in completion.items() if k != "usage"
    }
    usage = edited["usage"]
    kept = {k: v for k, v in UPSTREAM_USAGE.items() if k != "prompt_tokens_details"}
    assert {k: usage[k] for k in kept} == kept
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    assert cache_fields(usage)["created"] == system + document
    assert int(result.headers["content-length"]) == len(result.body)


def _sse(nl: str, data: str, *payloads: Any) -> str:
    events = [f": upstream comment{nl}{nl}"]
    for payload in payloads:
        value = payload if isinstance(payload, str) else codec.dumps(payload).decode()
        events.append(f"{data}{value}{nl}{nl}")
    return "".join(events)


def _frame(content: str | None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    delta = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    frame: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "choices": delta}
    if usage is not None:
        frame["usage"] = usage
    return frame


@pytest.mark.parametrize(
    ("nl", "data", "split"),
    [
        pytest.param("\n", "data: ", "frames", id="lf-data-space-one-chunk"),
        pytest.param("\r\n", "data:", "bytes:9", id="crlf-data-no-space-nine-byte-chunks"),
        pytest.param("\r\n", "data: ", "bytes:4", id="crlf-data-space-four-byte-chunks"),
    ],
)
def test_stream_edits_only_the_usage_frames(stack: Stack, nl: str, data: str, split: str) -> None:
    raw = _sse(
        nl,
        data,
        _frame("Hel"),
        _frame("lo", {"prompt_tokens": 900, "completion_tokens": 1, "total_tokens": 901}),
        _frame(None, UPSTREAM_USAGE),
        "[DONE]",
    )
    answer = Answer(
        tag=tag(), raw=raw, split=split, content_type="text/event-stream", chunk_delay_ms=1
    )
    result = send(stack, cached_request(stream=True), stack.new_key(), answer)

    client, upstream = split_events(result.body), split_events(raw.encode())
    assert len(client) == len(upstream) == 5
    changed = [i for i, (a, b) in enumerate(zip(client, upstream, strict=True)) if a != b]
    # Events: a comment, two content frames (the second with usage), the final usage frame,
    # [DONE]. The final usage frame waits for the split; the earlier usage (tokens still to
    # come) never waits: it carries the split only if classification was already done.
    assert changed in ([3], [2, 3])
    for i in changed:
        assert client[i].startswith(data.encode())
        assert client[i].endswith((nl + nl).encode())
        edited, original = event_json(client[i]), event_json(upstream[i])
        assert {k: v for k, v in edited.items() if k != "usage"} == {
            k: v for k, v in original.items() if k != "usage"
        }
        assert edited["usage"]["cache_creation_input_tokens"] > 0
    assert event_json(client[3])["usage"]["prompt_tokens"] == UPSTREAM_USAGE["prompt_tokens"]
    assert "content-length" not in result.headers


@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_an_enabled_model_without_a_tokenizer_gets_zero_fields(
    stack: Stack, streamed: bool
) -> None:
    # Cache-enabled in the tariffs, but no tokenizer maps it: nothing can be counted.
    model = "demo-no-tokenizer"
    stack.admin("models", "enable", model, "--min-prefix-tokens", "1")
    result = send(stack, cached_request(model=model, stream=streamed), stack.new_key())

    assert cache_fields(usage_of(result, streamed)) == ZERO_FIELDS


@pytest.mark.parametrize(
    ("turns", "read"),
    [
        pytest.param(18, True, id="entry-19-boundaries-back-is-read"),
        pytest.param(19, False, id="entry-20-boundaries-back-is-not-read"),
    ],
)
def test_the_walk_back_reaches_19_boundaries_before_a_breakpoint(
    stack: Stack, turns: int, read: bool
) -> None:
    (system,) = _count(stack, SYSTEM)
    key = stack.new_key()
    send(
        stack,
        {"model": "demo", "messages": [{"role": "system", "content": [text(SYSTEM, marker())]}]},
        key,
    )
    _entries_after_commit(stack, key, 1)
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    messages += [{"role": "user", "content": f"turn {i}"} for i in range(turns)]
    messages.append({"role": "user", "content": [text(DOCUMENT, marker())]})

    usage = usage_of(send(stack, {"model": "demo", "messages": messages}, key), streamed=False)

    # The only breakpoint is block turns + 1; the entry is at block 0.
    assert usage["cache_read_input_tokens"] == (system if read else 0)
    assert usage["cache_creation_input_tokens"] > 0


def test_chat_requests_reach_the_upstream_without_accept_encoding(stack: Stack) -> None:
    """A compressed answer could not be edited, so Envoy asks the upstream for plain bytes."""
    answer = Answer(tag=tag())
    with stack.client() as client:
        response = client.post(
            CHAT,
            content=codec.dumps(cached_request()),
            headers={**headers(stack.new_key(), answer), "accept-encoding": "gzip, br"},
        )
    assert response.status_code == 200
    [record] = stack.records(answer.tag)
    assert "accept-encoding" not in record.headers
    assert cache_fields(response.json()["usage"])["created"] > 0
