"""Properties of the Messages and Responses dialects on generated bodies.

The oracle strips markers from the parsed body by the dialect's rules (written again here from
DESIGN §12), independently of the splicing code: the forwarded body must parse to exactly that,
be the received text with cuts only, never carry a marker where one is read, and prepare to
itself again.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.core import request, spans
from extproc.core.dialects import Dialect, messages, responses
from extproc.core.errors import MarkerError
from extproc.core.model import RequestPolicy

POLICY = RequestPolicy()
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MARK = "cache_control"

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
markers = st.sampled_from(
    [
        None,
        {"type": "ephemeral"},
        {"type": "ephemeral", "ttl": "1h"},
        {"type": "ephemeral", "ttl": "5m"},
    ]
)
absent = st.just("absent")
marker_or_absent = absent | markers
# a cache_control that is content: inside a schema, on a message, inside a tool result
content_marker = st.fixed_dictionaries({MARK: st.just({"type": "ephemeral"})})


def _with(value: dict[str, Any], marker: Any) -> dict[str, Any]:
    return value if marker == "absent" else {**value, MARK: marker}


text_blocks = st.builds(lambda t, m: _with({"type": "text", "text": t}, m), texts, marker_or_absent)
tool_use = st.builds(
    lambda m: _with({"type": "tool_use", "id": "t1", "name": "f", "input": {MARK: 1}}, m),
    marker_or_absent,
)
tool_result = st.builds(
    lambda t, m: _with(
        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": t,
                                                                   MARK: {"type": "x"}}]},
        m,
    ),
    texts,
    marker_or_absent,
)  # fmt: skip
anthropic_blocks = st.lists(text_blocks | tool_use | tool_result, max_size=3)
anthropic_tools = st.lists(
    st.builds(
        lambda n, m: _with({"name": n, "input_schema": {"properties": {MARK: {}}}}, m),
        texts,
        marker_or_absent,
    ),
    max_size=2,
)
messages_bodies = st.fixed_dictionaries(
    {
        "model": st.just("m"),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "assistant"]),
                    "content": texts | anthropic_blocks,
                },
                optional={MARK: st.just({"type": "ephemeral"})},  # on a message: content
            ),
            max_size=3,
        ),
    },
    optional={
        "system": texts | st.lists(text_blocks, max_size=2),
        "tools": anthropic_tools,
        MARK: markers,
        "stream": st.booleans(),
        "metadata": content_marker,
    },
)

parts = st.builds(lambda t, m: _with({"type": "input_text", "text": t}, m), texts, marker_or_absent)
message_items = st.builds(
    lambda r, c, m: _with({"role": r, "content": c}, m),
    st.sampled_from(["user", "assistant", "developer"]),
    texts | st.lists(parts, max_size=2),
    marker_or_absent,
)
call_items = st.builds(
    lambda m: _with({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}, m),
    marker_or_absent,
)
responses_bodies = st.fixed_dictionaries(
    {"model": st.just("m"), "input": texts | st.lists(message_items | call_items, max_size=3)},
    optional={
        "instructions": texts,
        "tools": st.lists(
            st.builds(lambda m: _with({"type": "function", "name": "f"}, m), marker_or_absent),
            max_size=2,
        ),
        MARK: markers,
        "stream": st.booleans(),
    },
)
layouts = st.sampled_from([None, 1, "\t"])  # json.dumps indent: compact, spaced, tabs


def _strip_messages(body: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k != MARK}
    if "tools" in out:
        out["tools"] = [_drop(t) for t in out["tools"]]
    if isinstance(out.get("system"), list):
        out["system"] = [_drop(b) for b in out["system"]]
    out["messages"] = [
        {**m, "content": [_drop(b) for b in m["content"]]} if isinstance(m["content"], list) else m
        for m in out["messages"]
    ]
    return out


def _strip_responses(body: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k != MARK}
    if "tools" in out:
        out["tools"] = [_drop(t) for t in out["tools"]]
    if isinstance(out["input"], list):
        items = [_drop(i) for i in out["input"]]
        out["input"] = [
            {**i, "content": [_drop(p) for p in i["content"]]}
            if isinstance(i.get("content"), list)
            else i
            for i in items
        ]
    return out


def _drop(value: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k != MARK}


def _is_cuts_of(small: str, big: str) -> bool:
    it = iter(big)
    return all(ch in it for ch in small)


def _check(dialect: Dialect, body: dict[str, Any], indent: Any, expected: dict[str, Any]) -> None:
    raw = json.dumps(body, indent=indent, ensure_ascii=False).encode()
    try:
        prepared = request.prepare(raw, POLICY, dialect=dialect)
    except MarkerError:
        return  # more than four breakpoints, or an automatic one with no slot left
    assert prepared is not None
    forwarded = spans.decode(prepared.body)
    assert json.loads(forwarded) == expected
    assert _is_cuts_of(forwarded, spans.decode(raw))
    assert (prepared.body is raw) is not prepared.changed
    walked = request.prepare_walked(raw, POLICY, dialect=dialect)
    assert walked is not None
    assert (walked.body, walked.breakpoints) == (prepared.body, prepared.breakpoints)
    again = request.prepare_walked(prepared.body, POLICY, dialect=dialect)
    assert again is not None
    assert again.body is prepared.body
    assert again.breakpoints == ()
    assert again.hashes == walked.hashes  # markers never change a hash


@PROPERTY
@given(messages_bodies, layouts)
def test_messages_forwarded_body_is_the_body_without_its_markers(
    body: dict[str, Any], indent: Any
) -> None:
    _check(messages.DIALECT, body, indent, _strip_messages(body))


@PROPERTY
@given(responses_bodies, layouts)
def test_responses_forwarded_body_is_the_body_without_its_markers(
    body: dict[str, Any], indent: Any
) -> None:
    _check(responses.DIALECT, body, indent, _strip_responses(body))
