"""The quick-start examples: a request worth caching per API, the curls that send them, the check.

Each example's system prompt carries a ``cache_control`` marker and is long enough to pass the
floor ``extproc dev`` gives the demo model; one example per API (chat completions, Anthropic
Messages, OpenAI Responses), each with a prompt of its own so their entries do not meet. Sent
twice with the same key, the first answer's usage shows a cache write and the second a read of
the same number of tokens; sent once more as a stream (on chat without ``stream_options``: the
sidecar still makes the stream end with the usage) it reads again.
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
from extproc.devtools.devstack import DevStackError
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


QUESTION = "When can I pick up my bike if I bring it on Monday?"
# The path of each API, and the sentence that keeps its example's prompt its own.
PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}
API_NAMES = {
    "chat": "OpenAI chat completions",
    "messages": "Anthropic Messages",
    "responses": "OpenAI Responses",
}


def _system(api: str) -> dict[str, Any]:
    text = f"{EXAMPLE_SYSTEM_PROMPT} This assistant answers on the {API_NAMES[api]} API."
    if api == "chat":
        text = EXAMPLE_SYSTEM_PROMPT
    kind = "input_text" if api == "responses" else "text"
    return {"type": kind, "text": text, "cache_control": {"type": "ephemeral", "ttl": "5m"}}


def example_body(model: str, api: str = "chat") -> dict[str, Any]:
    """A request of ``api`` whose system prompt is marked for caching and long enough for it."""
    user = {"role": "user", "content": QUESTION}
    if api == "messages":
        return {"model": model, "max_tokens": 64, "system": [_system(api)], "messages": [user]}
    if api == "responses":
        system = {"role": "system", "content": [_system(api)]}
        return {"model": model, "max_output_tokens": 64, "input": [system, user]}
    system = {"role": "system", "content": [_system(api)]}
    return {"model": model, "max_tokens": 64, "messages": [system, user]}


def curl_command(url: str, key_shown: str, model: str, api: str = "chat") -> str:
    """A ready-to-paste curl for the example request of ``api``."""
    auth = shlex.quote(f"Authorization: Bearer {key_shown}")
    if key_shown.startswith("$"):
        auth = f'"Authorization: Bearer {key_shown}"'
    body = shlex.quote(codec.dumps(example_body(model, api)).decode())
    return (
        f"curl -s {url}{PATHS[api]} \\\n"
        f"  -H {auth} \\\n"
        "  -H 'Content-Type: application/json' \\\n"
        f"  -d {body}"
    )


def curl_commands(url: str, key_shown: str, model: str) -> str:
    """One curl per API, each under a comment naming it."""
    return "\n\n".join(
        f"# {API_NAMES[api]}\n{curl_command(url, key_shown, model, api)}" for api in PATHS
    )


def check(url: str, model: str, key: str) -> int:
    """Send each API's example twice, then streamed: 0 when each writes, then reads twice."""
    problems: list[str] = []
    for api in PATHS:
        if problems:
            break
        try:
            problems = _check_api(url, model, key, api)
        except NotServed as exc:
            if api == "chat":
                raise
            print(f"{api}: skipped, {exc}", flush=True)
    if not problems:
        forged = _send(url, model, f"{key}-other", {DEFAULT_PRINCIPAL_HEADER: principal_of(key)})
        print("forged-principal usage: " + codec.dumps(forged).decode(), flush=True)
        problems = forged_problems(forged)
    for problem in problems:
        print(f"check failed: {problem}", file=sys.stderr)
    if not problems:
        print(
            "check passed: on every API the first request wrote the cache, the next ones read "
            "it, and a forged principal header read nothing"
        )
    return 1 if problems else 0


def _check_api(url: str, model: str, key: str, api: str) -> list[str]:
    first = _send(url, model, key, api=api)
    print(f"{api} first usage: " + codec.dumps(first).decode(), flush=True)
    second = _send_until_read(url, model, key, api)
    print(f"{api} second usage: " + codec.dumps(second).decode(), flush=True)
    problems = [f"{api}: {p}" for p in usage_problems(first, second)]
    if problems:
        return problems
    streamed = _send_streamed(url, model, key, api)
    print(f"{api} streamed usage: " + codec.dumps(streamed).decode(), flush=True)
    written = first.get("cache_creation_input_tokens")
    return [f"{api}: {p}" for p in read_problems(written, streamed, "streamed")]


class NotServed(DevStackError):
    """The upstream has no such API (an OpenAI-only server has no Messages)."""


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
    url: str,
    body: dict[str, Any],
    key: str,
    extra: Mapping[str, str] | None = None,
    api: str = "chat",
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **(extra or {})}
    try:
        answer = httpx.post(f"{url}{PATHS[api]}", json=body, headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        raise DevStackError(f"request through Envoy failed: {exc}") from None
    if answer.status_code in (404, 405):
        raise NotServed(f"the upstream does not serve {PATHS[api]} (HTTP {answer.status_code})")
    if answer.status_code != 200:
        raise DevStackError(f"request through Envoy: HTTP {answer.status_code}: {answer.text}")
    return answer


def _send(
    url: str, model: str, key: str, extra: Mapping[str, str] | None = None, api: str = "chat"
) -> dict[str, Any]:
    answer = _post(url, example_body(model, api), key, extra, api)
    usage = codec.loads(answer.content).get("usage")
    if not isinstance(usage, dict):
        raise DevStackError(f"the answer has no usage object: {answer.text}")
    return usage


def _send_streamed(url: str, model: str, key: str, api: str) -> dict[str, Any]:
    """The usage of the example streamed (chat: without ``stream_options``, which is forced)."""
    answer = _post(url, {**example_body(model, api), "stream": True}, key, api=api)
    usage = stream_usage(answer.text)
    if usage is None:
        raise DevStackError(f"the stream has no usage frame: {answer.text}")
    return usage


def stream_usage(text: str) -> dict[str, Any] | None:
    """The usage a client keeps from an SSE body: chat's first usage frame, Messages' start
    overwritten by its delta (as Anthropic's SDKs do), Responses' final ``response.usage``."""
    kept: dict[str, Any] | None = None
    for line in text.splitlines():
        data = line.removeprefix("data:").strip()
        if not line.startswith("data:") or not data.startswith("{"):
            continue
        doc = codec.loads(data)
        holder = doc.get("message") or doc.get("response") or doc
        usage = holder.get("usage") if isinstance(holder, dict) else None
        if isinstance(usage, dict):
            kept = {**(kept or {}), **usage}
            if "choices" in doc:
                return kept
    return kept


def _send_until_read(url: str, model: str, key: str, api: str = "chat") -> dict[str, Any]:
    deadline = time.monotonic() + READ_RETRY_S
    while True:
        usage = _send(url, model, key, api=api)
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
