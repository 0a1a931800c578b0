"""The accounting record in Envoy's JSON access log, and the metrics that count the same requests.

Real requests through the real Envoy (its shipped access-log format, written to a file) and the
real ``extproc serve``; each request carries its own user agent to find its log entry.
"""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest

from extproc.core import codec
from tests.deploy.monitoring import names_used
from tests.e2e.chat import (
    CHAT,
    SYSTEM,
    Answer,
    cached_request,
    headers,
    marker,
    stream_usage,
    tag,
    text,
    wait_for_read,
)
from tests.plugins.metrics import scrape, value
from tests.plugins.records import RECORD_FIELDS
from tests.plugins.stack import Stack, StackSettings, free_port

pytestmark = pytest.mark.e2e

METRICS = f"127.0.0.1:{free_port()}"
STACK = StackSettings(principal_source="api_keys", extra_env=(("EXTPROC_METRICS_LISTEN", METRICS),))
STREAMED = [pytest.param(False, id="json"), pytest.param(True, id="sse")]
FIELDS = RECORD_FIELDS


def _post(
    stack: Stack, body: dict[str, Any], key: str | None, answer: Answer | None = None
) -> tuple[httpx.Response, str]:
    """Send ``body``; the response and the user agent that finds its access-log entry."""
    agent = f"e2e-record-{tag()}"
    sent = {**headers(key, answer or Answer(tag=tag())), "user-agent": agent}
    with stack.client() as client:
        response = client.post(CHAT, content=codec.dumps(body), headers=sent)
    return response, agent


def _usage(response: httpx.Response, streamed: bool) -> dict[str, Any]:
    if streamed:
        return stream_usage(response.content)
    found: dict[str, Any] = response.json()["usage"]
    return found


def _principal(stack: Stack, key: str) -> str | None:
    """The principal the record shows: none when it is the key's hash (``key_hash``)."""
    return None if stack.principal_source == "key_hash" else stack.principal_of(key)


def _record(stack: Stack, agent: str) -> dict[str, Any]:
    entry = stack.access_log(agent)
    found: dict[str, Any] = entry["prompt_cache"]
    assert set(found) == FIELDS, found
    return found


@pytest.mark.parametrize("streamed", STREAMED)
def test_a_write_then_a_read_of_the_same_size(stack: Stack, streamed: bool) -> None:
    key = stack.new_key()
    body = cached_request(stream=streamed)
    first, agent = _post(stack, body, key)
    usage = _usage(first, streamed)
    written = _record(stack, agent)

    assert written == {
        "outcome": "create_only",
        "reason": "",
        "model": "demo",
        "principal": _principal(stack, key),
        "route": "chat_completions",
        "prompt_tokens": usage["prompt_tokens"],
        "read": 0,
        "creation_5m": usage["cache_creation"]["ephemeral_5m_input_tokens"],
        "creation_1h": usage["cache_creation"]["ephemeral_1h_input_tokens"],
        "creation_24h": 0,
        "read_source": "index",
        "commit": "scheduled",
    }
    assert written["creation_5m"] > 0
    assert written["creation_1h"] > 0

    wait_for_read(stack, body, key)
    again, agent = _post(stack, body, key)
    read = _record(stack, agent)

    assert read["outcome"] == "read"
    assert read["read"] == written["creation_5m"] + written["creation_1h"]
    assert read["read"] == _usage(again, streamed)["cache_read_input_tokens"]
    assert (read["creation_5m"], read["creation_1h"], read["commit"]) == (0, 0, "scheduled")


def test_the_log_line_holds_no_key_and_no_hash_of_it(stack: Stack) -> None:
    key = stack.new_key()
    _response, agent = _post(stack, cached_request(), key)
    line = codec.dumps(stack.access_log(agent)).decode()

    assert key not in line
    assert hashlib.sha256(key.encode()).hexdigest() not in line
    assert "ledger" not in line.lower()  # no prompt text either


@pytest.mark.parametrize(
    ("model", "authorized", "reason"),
    [
        pytest.param("demo", False, "no_bearer", id="no-bearer"),
        pytest.param("demo", True, "unknown_principal", id="unknown-key"),
        pytest.param("demo-off", True, "model_disabled", id="model-disabled"),
    ],
)
@pytest.mark.parametrize("streamed", STREAMED)
def test_an_inactive_request_says_why(
    stack: Stack, streamed: bool, model: str, authorized: bool, reason: str
) -> None:
    key = "sk-e2e-nobody-knows-this-key" if authorized else None
    response, agent = _post(stack, cached_request(model=model, stream=streamed), key)
    found = _record(stack, agent)

    assert response.status_code == 200
    assert found["outcome"] == "inactive"
    assert found["reason"] == reason
    assert (found["read"], found["creation_5m"], found["creation_1h"]) == (0, 0, 0)
    assert (found["principal"], found["read_source"], found["commit"]) == (None, "none", "none")


@pytest.mark.parametrize("streamed", STREAMED)
def test_zero_active_without_markers(stack: Stack, streamed: bool) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": streamed}
    key = stack.new_key()
    _response, agent = _post(stack, body, key)
    found = _record(stack, agent)

    assert (found["outcome"], found["reason"], found["model"]) == (
        "zero_active",
        "no_markers",
        "demo",
    )
    assert (found["principal"], found["commit"]) == (_principal(stack, key), "none")


def test_a_stream_with_an_error_frame_records_its_veto(stack: Stack) -> None:
    key = stack.new_key()
    answer = Answer(tag=tag(), error_frame=True)
    response, agent = _post(stack, cached_request(stream=True), key, answer)
    found = _record(stack, agent)

    assert response.status_code == 200
    assert found["outcome"] == "create_only"
    assert found["commit"] == "error_frame"


@pytest.mark.parametrize("streamed", STREAMED)
def test_a_failed_answer_records_its_veto(stack: Stack, streamed: bool) -> None:
    key = stack.new_key()
    answer = Answer(tag=tag(), status=503)
    response, agent = _post(stack, cached_request(stream=streamed), key, answer)
    entry = stack.access_log(agent)

    assert response.status_code == 503
    assert entry["code"] == 503
    assert entry["prompt_cache"]["commit"] == "non_2xx"


def test_other_traffic_has_no_record(stack: Stack) -> None:
    agent = f"e2e-record-{tag()}"
    with stack.client() as client:
        client.get("/v1/models", headers={"user-agent": agent})
    entry = stack.access_log(agent)

    assert entry["prompt_cache"] is None
    assert entry["route"] == "passthrough"


def test_the_metrics_endpoint_counts_the_reads(stack: Stack) -> None:
    key = stack.new_key()
    body = cached_request(question="How much was the rent?")
    _post(stack, body, key)
    usage = wait_for_read(stack, body, key)
    samples = scrape(f"http://{METRICS}/metrics")

    read = usage["cache_read_input_tokens"]
    assert value(samples, "extproc_read_tokens_total", model="demo", source="index") >= read
    assert value(samples, "extproc_outcomes_total", model="demo", outcome="read") >= 1
    assert value(samples, "extproc_outcomes_total", model="demo", outcome="create_only") >= 1


def test_the_dashboard_and_the_rules_query_only_exported_metrics(stack: Stack) -> None:
    key = stack.new_key()
    bad = cached_request()
    bad["messages"][0]["content"][0]["cache_control"] = {"type": "persistent"}
    rejected, _agent = _post(stack, bad, key)
    _post(stack, cached_request(stream=True), key, Answer(tag=tag(), error_frame=True))
    wait_for_read(stack, cached_request(question="What was catered?"), key)
    exported = {sample.name for sample in scrape(f"http://{METRICS}/metrics")}

    assert rejected.status_code == 400
    assert names_used() - exported == set()


ROUTE_BODIES: dict[str, dict[str, Any]] = {
    "/v1/messages": {
        "model": "demo",
        "max_tokens": 32,
        "system": [text(SYSTEM + " Messages record.", marker())],
        "messages": [{"role": "user", "content": "hi"}],
    },
    "/v1/responses": {
        "model": "demo",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": SYSTEM + " Responses record."},
                    {"type": "input_text", "text": "hi", "cache_control": marker()},
                ],
            }
        ],
    },
}


@pytest.mark.parametrize("path", list(ROUTE_BODIES))
def test_each_route_records_a_write_then_a_read(stack: Stack, path: str) -> None:
    key = stack.new_key()
    records = []
    for _ in range(50):  # the first answer's commit lands after it: repeat until a read
        agent = f"e2e-record-{tag()}"
        sent = {**headers(key, Answer(tag=tag())), "user-agent": agent}
        with stack.client() as client:
            response = client.post(path, content=codec.dumps(ROUTE_BODIES[path]), headers=sent)
        assert response.status_code == 200, response.text
        records.append(_record(stack, agent))
        if records[-1]["outcome"] == "read":
            break
    write, read = records[0], records[-1]
    route = path.rpartition("/")[2]
    assert (write["route"], write["outcome"], write["commit"]) == (
        route,
        "create_only",
        "scheduled",
    )
    assert read["outcome"] == "read"
    assert read["route"] == route
    assert read["read"] == write["creation_5m"] + write["creation_1h"] + write["creation_24h"] > 0
    assert read["prompt_tokens"] is not None
    assert read["prompt_tokens"] >= read["read"]
