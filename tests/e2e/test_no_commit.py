"""Nothing is committed unless the answer completed successfully with a usage (DESIGN §4.4)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from extproc.core import codec
from tests.e2e.chat import (
    Answer,
    barrier,
    cached_request,
    exchange,
    post,
    send,
    stream_raw,
    tag,
    usage_of,
    wait_for_read,
)
from tests.plugins.stack import Stack

pytestmark = pytest.mark.e2e


def _assert_next_is_not_a_read(stack: Stack, key: str, streamed: bool) -> None:
    barrier(stack, key)
    usage = usage_of(send(stack, cached_request(stream=streamed), key), streamed)
    assert usage["cache_read_input_tokens"] == 0
    assert usage["cache_creation_input_tokens"] > 0


def _wait_until_upstream_saw_the_end(stack: Stack, answer: Answer) -> None:
    for _ in range(100):
        records = stack.records(answer.tag)
        if records and (records[0].aborted or records[0].finished):
            return
        time.sleep(0.05)
    raise AssertionError(f"the upstream never finished {answer.tag}")


@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
@pytest.mark.parametrize("status", [429, 500, 503])
def test_non_2xx_answer_commits_nothing(stack: Stack, streamed: bool, status: int) -> None:
    key = stack.new_key()
    result = exchange(stack, cached_request(stream=streamed), key, Answer(tag=tag(), status=status))

    assert result.status == status
    assert result.body == result.upstream_sent
    _assert_next_is_not_a_read(stack, key, streamed)


@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_missing_usage_commits_nothing(stack: Stack, streamed: bool) -> None:
    key = stack.new_key()
    result = send(stack, cached_request(stream=streamed), key, Answer(tag=tag(), usage=False))

    assert b'"usage"' not in result.body
    _assert_next_is_not_a_read(stack, key, streamed)


USAGE = {"prompt_tokens": 1000, "completion_tokens": 1, "total_tokens": 1001}


@pytest.mark.parametrize(
    "document",
    [
        pytest.param({"error": {"message": "overloaded", "type": "server_error"}}, id="error"),
        pytest.param(
            {"error": {"message": "overloaded", "type": "server_error"}, "usage": USAGE},
            id="error-with-usage",
        ),
        pytest.param({"object": "error", "message": "overloaded", "usage": USAGE}, id="object"),
    ],
)
def test_a_2xx_json_error_document_commits_nothing(stack: Stack, document: Any) -> None:
    key = stack.new_key()
    raw = codec.dumps(document).decode()
    result = send(stack, cached_request(), key, Answer(tag=tag(), raw=raw))

    answered = result.json()
    assert {k: v for k, v in answered.items() if k != "usage"} == {
        k: v for k, v in document.items() if k != "usage"
    }
    _assert_next_is_not_a_read(stack, key, streamed=False)


def test_a_2xx_answer_that_is_not_json_passes_untouched_and_commits_nothing(stack: Stack) -> None:
    key = stack.new_key()
    raw = '{"id": "chatcmpl-cut", "usage": {"prompt_tokens": 10'
    result = send(stack, cached_request(), key, Answer(tag=tag(), raw=raw))

    assert result.body == raw.encode()
    _assert_next_is_not_a_read(stack, key, streamed=False)


def test_error_frame_mid_stream_commits_nothing(stack: Stack) -> None:
    key = stack.new_key()
    result = send(stack, cached_request(stream=True), key, Answer(tag=tag(), error_frame=True))

    assert b'"error"' in result.body
    _assert_next_is_not_a_read(stack, key, streamed=True)


def test_upstream_reset_mid_stream_commits_nothing(stack: Stack) -> None:
    key = stack.new_key()
    # The upstream holds after 3 chunks until the client has the first bytes, then resets: the
    # reset always comes after Envoy forwarded the headers (never a 502 "reset before headers").
    answer = Answer(tag=tag(), hold_after=3, reset_after=3)
    partial = stream_raw(stack, cached_request(), key, answer, release_after=1)

    assert partial.status == 200
    assert partial.body.startswith(b"data: ")
    assert partial.error is not None
    assert b"[DONE]" not in partial.body
    _assert_next_is_not_a_read(stack, key, streamed=True)


def test_upstream_reset_of_a_json_answer_commits_nothing(stack: Stack) -> None:
    key = stack.new_key()
    result = exchange(stack, cached_request(), key, Answer(tag=tag(), reset_after=0))

    assert result.status >= 500
    _assert_next_is_not_a_read(stack, key, streamed=False)


def test_client_disconnect_mid_stream_commits_nothing(stack: Stack) -> None:
    key = stack.new_key()
    answer = Answer(tag=tag(), pause_after=3)
    partial = stream_raw(stack, cached_request(), key, answer, hang_up_after=1)

    assert partial.status == 200
    _wait_until_upstream_saw_the_end(stack, answer)
    assert stack.records(answer.tag)[0].aborted
    _assert_next_is_not_a_read(stack, key, streamed=True)


def test_client_disconnect_before_a_json_answer_commits_nothing(stack: Stack) -> None:
    key = stack.new_key()
    answer = Answer(tag=tag(), hold_after=0)  # headers sent, the body held until released
    with (
        httpx.Client(base_url=stack.url, timeout=httpx.Timeout(60, read=0.5)) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        post(client, cached_request(), key, answer)
    stack.release(answer.tag)

    _wait_until_upstream_saw_the_end(stack, answer)
    _assert_next_is_not_a_read(stack, key, streamed=False)


def test_a_completed_stream_after_a_failed_one_commits(stack: Stack) -> None:
    key = stack.new_key()
    stream_raw(stack, cached_request(), key, Answer(tag=tag(), reset_after=2))
    send(stack, cached_request(stream=True), key)

    usage = wait_for_read(stack, cached_request(stream=True), key)

    assert usage["cache_creation_input_tokens"] == 0
