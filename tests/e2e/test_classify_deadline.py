"""A classification that misses its deadline: the answer goes out untouched, nothing waits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.chat import cached_request, exchange, send, usage_of, wait_for_read
from tests.plugins.stack import RecordingTokenizer, Stack, StackSettings

pytestmark = pytest.mark.e2e

# The server's default deadline; Envoy's message timeout stays at its rendered 2 s.
STACK = StackSettings(classify_deadline_ms=150)
# Longer than the deadline, shorter than the tokenizer-service call timeout (1 s).
SLOW_S = 0.6


@pytest.fixture
def slow_tokenizer(stack: Stack) -> Iterator[RecordingTokenizer]:
    if stack.tokenizer is None:
        pytest.skip("needs the suite's own tokenizer service to slow it down")
    stack.tokenizer.tokenize_delay = SLOW_S
    yield stack.tokenizer
    stack.tokenizer.tokenize_delay = 0.0


def test_missed_deadlines_from_a_cold_start_leave_answers_untouched_and_delay_none(
    stack: Stack, slow_tokenizer: RecordingTokenizer
) -> None:
    # The first requests of a fresh server: cold pool, cold memos, a tokenizer slower than the
    # deadline. Each one's classification is abandoned; none of the next replies may wait for
    # it (Envoy answers 504 when a reply takes longer than its message timeout).
    key = stack.new_key()
    results = [
        exchange(stack, cached_request(stream=streamed), key)
        for streamed in (False, True, False, True, False, True)
    ]

    assert [r.status for r in results] == [200] * len(results)
    for result in results:
        assert result.body == result.upstream_sent  # inactive: not even zero fields
        assert result.upstream_body is not None
        assert b"cache_control" not in result.upstream_body
    assert slow_tokenizer.started >= 1


@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_after_the_tokenizer_recovers_the_next_request_is_accounted(
    stack: Stack, streamed: bool
) -> None:
    key = stack.new_key()
    body = cached_request(stream=streamed)

    # On a loaded machine a single classification may still miss 150 ms: ask a few times.
    for _ in range(20):
        first = usage_of(send(stack, body, key), streamed)
        if first.get("cache_creation_input_tokens"):
            break
    second = wait_for_read(stack, body, key)

    assert first["cache_creation_input_tokens"] > 0
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
