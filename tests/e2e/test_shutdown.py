"""Server restarts and outages: SIGTERM loses no commit; fail-closed and fail-open as documented."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.commands.health import probe
from extproc.core import codec
from tests.e2e.chat import (
    CHAT,
    Answer,
    cached_request,
    exchange,
    headers,
    split_events,
    stream_usage,
    tag,
    wait_for_read,
)
from tests.plugins.stack import Stack, StackSettings, start_envoy

pytestmark = pytest.mark.e2e

# Keys go through the admin CLI here (api_keys), unlike the key_hash default elsewhere.
STACK = StackSettings(principal_source="api_keys", shutdown_grace_s=20.0)


@pytest.fixture
def restart(stack: Stack) -> Iterator[None]:
    """Bring the server back after a test that stopped it."""
    stack.require_local()
    yield
    assert stack.extproc is not None
    if stack.extproc.process is None or stack.extproc.process.poll() is not None:
        stack.extproc.stop()
        stack.start_extproc()


def _stop_extproc(stack: Stack) -> int:
    assert stack.extproc is not None
    stack.extproc.signal(signal.SIGTERM)
    code = stack.extproc.wait(60)
    stack.extproc.stop()
    return code


def _wait_until_draining(stack: Stack) -> None:
    """Until the server stops reporting SERVING: it has begun its graceful shutdown."""
    for _ in range(200):
        if probe(stack.extproc_address, timeout=0.5) != "SERVING":
            return
        time.sleep(0.05)
    raise AssertionError("the server kept reporting SERVING after SIGTERM")


@pytest.mark.parametrize("streamed", [pytest.param(False, id="json"), pytest.param(True, id="sse")])
def test_an_unknown_api_key_leaves_the_answer_untouched(stack: Stack, streamed: bool) -> None:
    # This module's principal source is api_keys: a key that was never added names no tenant.
    unknown = f"sk-e2e-unknown-{tag()}"
    result = exchange(stack, cached_request(stream=streamed), unknown)

    assert result.status == 200
    assert result.body == result.upstream_sent
    assert result.upstream_body is not None
    assert b"cache_control" not in result.upstream_body


def test_sigterm_with_a_stream_in_flight_loses_no_commit(stack: Stack, restart: None) -> None:
    key = stack.new_key()
    answer = Answer(tag=tag(), hold_after=1)
    body = codec.dumps({**cached_request(), "stream": True})
    assert stack.extproc is not None
    with stack.client() as client:
        request = client.build_request("POST", CHAT, content=body, headers=headers(key, answer))
        response = client.send(request, stream=True)
        try:
            chunks = response.iter_raw()
            first = next(chunks)
            stack.extproc.signal(signal.SIGTERM)
            _wait_until_draining(stack)
            stack.release(answer.tag)
            rest = b"".join(chunks)
        finally:
            response.close()
    assert stack.extproc.wait(60) == 0

    received = first + rest
    [record] = stack.records(answer.tag)
    assert len(split_events(received)) == len(split_events(b"".join(record.sent)))
    created = stream_usage(received)["cache_creation_input_tokens"]
    assert created > 0

    stack.extproc.stop()
    stack.start_extproc()
    usage = wait_for_read(stack, {**cached_request(), "stream": True}, key)
    assert usage["cache_read_input_tokens"] == created


def test_server_down_fails_closed(stack: Stack, restart: None) -> None:
    key = stack.new_key()
    _stop_extproc(stack)

    chat = exchange(stack, cached_request(), key)
    other = exchange(stack, codec.dumps(cached_request()), key, path="/v1/embeddings")

    assert chat.status == 503
    assert chat.upstream_body is None
    assert other.status == 200


def test_fail_open_variant_forwards_unprocessed_when_the_server_is_down(
    stack: Stack, restart: None
) -> None:
    _stop_extproc(stack)
    open_stack = Stack(
        url="",
        upstream_url=stack.upstream_url,
        database_url=stack.database_url,
        principal_source=stack.principal_source,
        max_body_bytes=stack.max_body_bytes,
        enabled_ttls=stack.enabled_ttls,
        extproc_address=stack.extproc_address,
    )
    workdir = Path(tempfile.mkdtemp(prefix="extproc-e2e-open-"))
    try:
        start_envoy(open_stack, StackSettings(fail_open=True), workdir)
        body = {**cached_request(), "stream": True}
        result = exchange(open_stack, body, stack.new_key())
    finally:
        for process in open_stack.processes:
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    assert result.status == 200
    assert result.upstream_body == codec.dumps(body)  # markers unstripped, include_usage not forced
    assert result.body == result.upstream_sent
