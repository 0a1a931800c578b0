"""The fake upstream itself: its streams are valid SSE however they are split, and it records."""

from __future__ import annotations

import httpx
import pytest

from extproc.core import codec
from tests.e2e.chat import event_json, split_events
from tests.fakes.upstream import HEADER, Answer, FakeUpstream, Record, split_stream, sse_events


@pytest.mark.parametrize("crlf", [pytest.param(False, id="lf"), pytest.param(True, id="crlf")])
@pytest.mark.parametrize("how", ["frames", "awkward", "whole", "bytes:5"])
def test_splits_keep_every_byte(how: str, crlf: bool) -> None:
    events = sse_events("m", Answer(crlf=crlf), include_usage=True)
    chunks = split_stream(events, how)
    assert b"".join(chunks) == b"".join(events)
    assert split_events(b"".join(chunks)) == events


def test_awkward_split_cuts_inside_data_and_between_cr_and_lf() -> None:
    chunks = split_stream(sse_events("m", Answer(crlf=True), include_usage=True), "awkward")
    assert any(c.endswith(b"da") for c in chunks)
    assert any(c.endswith(b"\r") for c in chunks)
    assert any(c.startswith(b"\n") for c in chunks)
    assert any(c.endswith(b'"usa') for c in chunks)


@pytest.mark.parametrize(
    ("answer", "include", "has_usage"),
    [
        pytest.param(Answer(), True, True, id="include-usage"),
        pytest.param(Answer(), False, False, id="no-include-usage"),
        pytest.param(Answer(usage=False), True, False, id="usage-withheld"),
    ],
)
def test_usage_frame_only_when_asked_and_allowed(
    answer: Answer, include: bool, has_usage: bool
) -> None:
    events = sse_events("m", answer, include)
    values = [event_json(e) for e in events]
    usage = [v for v in values if isinstance(v, dict) and "usage" in v]
    assert bool(usage) == has_usage
    if usage:
        assert usage[0]["choices"] == []
    assert events[-1] == b"data: [DONE]\n\n"


def test_answer_round_trips_through_its_header() -> None:
    answer = Answer(tag="t", split="awkward", crlf=True, reset_after=3)
    assert Answer.decode(answer.encode()) == answer
    assert Answer.decode(None) == Answer()


async def test_records_what_it_received_and_sent() -> None:
    async with FakeUpstream() as upstream, httpx.AsyncClient(base_url=upstream.url) as client:
        body = codec.dumps(
            {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
        )
        answer = Answer(tag="abc", split="awkward")
        response = await client.post(
            "/v1/chat/completions", content=body, headers={HEADER: answer.encode()}
        )
        listed = await client.get("/__fake/requests", params={"tag": "abc"})

    [record] = [Record.from_json(r) for r in listed.json()]
    assert record.body == body
    assert record.finished
    assert b"".join(record.sent) == response.content
    assert response.headers["content-type"].startswith("text/event-stream")


async def test_error_status_and_reset() -> None:
    async with FakeUpstream() as upstream, httpx.AsyncClient(base_url=upstream.url) as client:
        failed = await client.post(
            "/v1/chat/completions",
            content=b'{"model": "m"}',
            headers={HEADER: Answer(status=503).encode()},
        )
        with pytest.raises(httpx.HTTPError):
            await client.post(
                "/v1/chat/completions",
                content=b'{"model": "m", "stream": true}',
                headers={HEADER: Answer(tag="r", reset_after=2).encode()},
            )

    assert failed.status_code == 503
    assert failed.json()["error"]["type"] == "server_error"
    assert upstream.records[-1].aborted
