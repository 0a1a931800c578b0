"""The quick-start example: a request worth caching, the curl that sends it, and the check.

The example's system prompt carries a ``cache_control`` marker and is long enough to pass the
floor ``extproc dev`` gives the demo model. Sent twice with the same key, the first answer's
usage shows a cache write and the second a read of the same number of tokens; sent once more
as a stream without ``stream_options``, the sidecar still makes the stream end with the usage.
Sent by another key that names the first key's principal in the principal header, it reads
nothing: Envoy drops the client's copy and the server never takes a tenant from a client.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Mapping
from typing import Any

import httpx

from extproc.adapters.pg_resolvers import key_hash
from extproc.core import codec
from extproc.devstack import DevStackError
from extproc.principals import DEFAULT_PRINCIPAL_HEADER

# The sidecar commits a cache write just after the answer; a read may need a moment longer.
READ_RETRY_S = 5.0
EXAMPLE_SYSTEM_PROMPT = (
    "You are the support assistant of a small bicycle repair shop. Answer in plain language, "
    "in at most three sentences, and never invent prices. The shop is open Monday to Friday "
    "from nine to six and on Saturday from ten to two. Repairs are done in the order the bikes "
    "arrive: a standard service takes two working days, a wheel rebuild three. We repair city, "
    "road and cargo bikes, but not electric motors. Bikes are picked up at the back door."
)


def example_body(model: str) -> dict[str, Any]:
    """A request whose system prompt is marked for caching and is long enough to be cached."""
    marker = {"type": "ephemeral", "ttl": "5m"}
    system = {"type": "text", "text": EXAMPLE_SYSTEM_PROMPT, "cache_control": marker}
    return {
        "model": model,
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": [system]},
            {"role": "user", "content": "When can I pick up my bike if I bring it on Monday?"},
        ],
    }


def curl_command(url: str, key_shown: str, model: str) -> str:
    """A ready-to-paste curl for the example request."""
    auth = shlex.quote(f"Authorization: Bearer {key_shown}")
    if key_shown.startswith("$"):
        auth = f'"Authorization: Bearer {key_shown}"'
    body = shlex.quote(codec.dumps(example_body(model)).decode())
    return (
        f"curl -s {url}/v1/chat/completions \\\n"
        f"  -H {auth} \\\n"
        "  -H 'Content-Type: application/json' \\\n"
        f"  -d {body}"
    )


def check(url: str, model: str, key: str) -> int:
    """Send the example twice, then streamed; 0 when it writes, then reads, then reads again."""
    first = _send(url, model, key)
    print("first usage: " + codec.dumps(first).decode(), flush=True)
    second = _send_until_read(url, model, key)
    print("second usage: " + codec.dumps(second).decode(), flush=True)
    problems = usage_problems(first, second)
    if not problems:
        streamed = _send_streamed(url, model, key)
        print("streamed usage: " + codec.dumps(streamed).decode(), flush=True)
        problems = read_problems(first.get("cache_creation_input_tokens"), streamed, "streamed")
    if not problems:
        forged = _send(url, model, f"{key}-other", {DEFAULT_PRINCIPAL_HEADER: principal_of(key)})
        print("forged-principal usage: " + codec.dumps(forged).decode(), flush=True)
        problems = forged_problems(forged)
    for problem in problems:
        print(f"check failed: {problem}", file=sys.stderr)
    if not problems:
        print(
            "check passed: the first request wrote the cache, the next ones read it, "
            "and a forged principal header read nothing"
        )
    return 1 if problems else 0


def principal_of(key: str) -> str:
    """The quick start's principal of ``key`` (``key_hash``): the hex SHA-256 of the key."""
    return key_hash(key).hex()


def forged_problems(usage: Mapping[str, Any]) -> list[str]:
    """What is wrong when another key names the first key's principal in the header."""
    read = usage.get("cache_read_input_tokens")
    if read != 0:
        return [f"another key forging the first key's principal: expected no read, got {read!r}"]
    return []


def _post(
    url: str, body: dict[str, Any], key: str, extra: Mapping[str, str] | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **(extra or {})}
    try:
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        raise DevStackError(f"request through Envoy failed: {exc}") from None
    if answer.status_code != 200:
        raise DevStackError(f"request through Envoy: HTTP {answer.status_code}: {answer.text}")
    return answer


def _send(url: str, model: str, key: str, extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    answer = _post(url, example_body(model), key, extra)
    usage = codec.loads(answer.content).get("usage")
    if not isinstance(usage, dict):
        raise DevStackError(f"the answer has no usage object: {answer.text}")
    return usage


def _send_streamed(url: str, model: str, key: str) -> dict[str, Any]:
    """The usage of the example streamed without ``stream_options`` (the sidecar forces it)."""
    answer = _post(url, {**example_body(model), "stream": True}, key)
    usage = stream_usage(answer.text)
    if usage is None:
        raise DevStackError(f"the stream has no usage frame: {answer.text}")
    return usage


def stream_usage(text: str) -> dict[str, Any] | None:
    """The first usage object in an SSE body, if any."""
    for line in text.splitlines():
        data = line.removeprefix("data:").strip()
        if not line.startswith("data:") or not data.startswith("{"):
            continue
        usage = codec.loads(data).get("usage")
        if isinstance(usage, dict):
            return usage
    return None


def _send_until_read(url: str, model: str, key: str) -> dict[str, Any]:
    deadline = time.monotonic() + READ_RETRY_S
    while True:
        usage = _send(url, model, key)
        if usage.get("cache_read_input_tokens") or time.monotonic() > deadline:
            return usage
        time.sleep(0.2)


def usage_problems(first: Mapping[str, Any], second: Mapping[str, Any]) -> list[str]:
    """What is wrong with a write-then-read pair of usage objects (empty when nothing is)."""
    written = first.get("cache_creation_input_tokens")
    problems = []
    if not isinstance(written, int) or written <= 0:
        problems.append(f"first request: expected a cache write, got {written!r}")
    if first.get("cache_read_input_tokens") != 0:
        problems.append("first request: expected no cache read")
    return problems + read_problems(written, second, "second request")


def read_problems(written: Any, usage: Mapping[str, Any], what: str) -> list[str]:
    """What is wrong with ``usage`` as a read of the ``written`` tokens."""
    problems = []
    read = usage.get("cache_read_input_tokens")
    if not read or read != written:
        problems.append(f"{what}: expected a read of {written!r} tokens, got {read!r}")
    if usage.get("cache_creation_input_tokens") != 0:
        problems.append(f"{what}: expected no cache write")
    return problems
