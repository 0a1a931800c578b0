"""``extproc explain`` through the real command line entry point."""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path
from typing import Any

import pytest

from extproc.cli import main
from extproc.core import codec

CHAT = "/v1/chat/completions"


def _reference_hashes(inputs: list[bytes]) -> list[str]:
    """Cumulative SHA-256 over hand-written block inputs, independent of the package."""
    running = hashlib.sha256()
    out = []
    for data in inputs:
        running.update(data)
        out.append(running.hexdigest())
    return out


def _run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: bytes, *flags: str
) -> tuple[int, str, str]:
    path = tmp_path / "request.json"
    path.write_bytes(body)
    code = main(["explain", *flags, str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def _block(index: int, where: str, role: str, kind: str, length: int) -> dict[str, Any]:
    return {"index": index, "where": where, "role": role, "kind": kind, "text_length": length}


def _point(block: int, ttl: str, automatic: bool = False) -> dict[str, Any]:
    return {"block": block, "ttl": ttl, "automatic": automatic}


STRING_BODY = {
    "model": "qwen",
    "messages": [
        {"role": "system", "content": "static system"},
        {"role": "user", "content": "hi"},
    ],
}
STRING_BLOCKS = [
    _block(0, "messages[0].content", "system", "text", 13),
    _block(1, "messages[1].content", "user", "text", 2),
]
DESIGN_VECTORS = [
    "3f64b6de25662606fce3fdbfc38c06d90282a10f28a6a12496225051481cf3e2",
    "b063c46136d7e666f8ff6dfbb59370f23dd93a60e692faceb73da98351330939",
]

ARRAY_BODY = {
    "model": "qwen",
    "stream": True,
    "messages": [
        {
            "role": "system",
            "content": [
                {
                    "type": "text",
                    "text": "Règles: a/b",
                    "cache_control": {"type": "ephemeral", "ttl": "1h"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "image_url",
                    "image_url": {"url": "https://x.test/i.png", "detail": "low"},
                },
                {"type": "text", "text": "日本語", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "tail", "cache_control": None},
            ],
        },
    ],
}

BILLING = "x-anthropic-billing-header: cc_version=2.1; cch=1f2e;"
TOOL_JSON = (
    b'{"function":{"name":"read_file","parameters":{"properties":{"cache_control":'
    b'{"type":"string"}},"type":"object"}},"type":"function"}'
)
CALL_JSON = (
    b'{"function":{"arguments":"{\\"path\\":\\"a/b\\"}","name":"read_file"},'
    b'"id":"call_1","type":"function"}'
)
AGENT_BODY = {
    "model": "qwen",
    "stream": True,
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "read_file",
                "parameters": {
                    "type": "object",
                    "properties": {"cache_control": {"type": "string"}},
                },
            },
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        }
    ],
    "messages": [
        {
            "role": "system",
            "content": [{"type": "text", "text": BILLING}, {"type": "text", "text": "Règles"}],
        },
        {"role": "user", "content": "read a/b"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path":"a/b"}'},
                    "cache_control": {"type": "ephemeral"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "日本語"},
    ],
    "cache_control": {"type": "ephemeral"},
}
AGENT_BLOCKS = [
    _block(0, "tools[0]", "tool_definition", "function", len(TOOL_JSON)),
    _block(1, "messages[0].content[1]", "system", "text", 6),
    _block(2, "messages[1].content", "user", "text", 8),
    _block(3, "messages[2].tool_calls[0]", "tool_call", "function", len(CALL_JSON)),
    _block(4, "messages[3].content", "tool", "text", 3),
]
AGENT_HASHES = _reference_hashes(
    [
        b"tool_definition\x00" + TOOL_JSON,
        'system\x00{"text":"Règles","type":"text"}'.encode(),
        b'user\x00{"text":"read a/b","type":"text"}',
        b"tool_call\x00" + CALL_JSON,
        'tool\x00{"text":"日本語","type":"text"}'.encode(),
    ]
)
WITHOUT_TOP = {k: v for k, v in AGENT_BODY.items() if k != "cache_control"}

EXPLAINED = [
    pytest.param(
        STRING_BODY,
        [],
        {
            "route": "chat",
            "model": "qwen",
            "stream": False,
            "blocks": STRING_BLOCKS,
            "breakpoints": [],
            "telemetry_blocks": [],
            "prefix_hashes": DESIGN_VECTORS,
            "forwarded_body_changed": False,
        },
        id="string-content",
    ),
    pytest.param(
        STRING_BODY,
        ["--path", CHAT + "?cacheBreakpoint=lastUserMessage"],
        {
            "route": "chat",
            "model": "qwen",
            "stream": False,
            "blocks": STRING_BLOCKS,
            "breakpoints": [_point(1, "1h", automatic=True)],
            "telemetry_blocks": [],
            "prefix_hashes": DESIGN_VECTORS,
            "forwarded_body_changed": False,
        },
        id="query-parameter",
    ),
    pytest.param(
        ARRAY_BODY,
        ["--default-ttl", "24h"],
        {
            "route": "chat",
            "model": "qwen",
            "stream": True,
            "blocks": [
                _block(0, "messages[0].content[0]", "system", "text", 11),
                _block(1, "messages[1].content[0]", "user", "image_url", 0),
                _block(2, "messages[1].content[1]", "user", "text", 3),
                _block(3, "messages[1].content[2]", "user", "text", 4),
            ],
            "breakpoints": [_point(0, "1h"), _point(2, "24h")],
            "telemetry_blocks": [],
            "prefix_hashes": _reference_hashes(
                [
                    b'system\x00{"text":"R\xc3\xa8gles: a/b","type":"text"}',
                    b'user\x00{"image_url":{"detail":"low","url":"https://x.test/i.png"},'
                    b'"type":"image_url"}',
                    b'user\x00{"text":"\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e","type":"text"}',
                    b'user\x00{"text":"tail","type":"text"}',
                ]
            ),
            "forwarded_body_changed": True,
        },
        id="array-content-several-markers",
    ),
    pytest.param(
        AGENT_BODY,
        [],
        {
            "route": "chat",
            "model": "qwen",
            "stream": True,
            "blocks": AGENT_BLOCKS,
            "breakpoints": [_point(0, "1h"), _point(3, "5m"), _point(4, "5m", automatic=True)],
            "telemetry_blocks": [{"where": "messages[0].content[0]", "text_length": len(BILLING)}],
            "prefix_hashes": AGENT_HASHES,
            "forwarded_body_changed": True,
        },
        id="tools-tool-calls-telemetry-automatic",
    ),
    pytest.param(
        AGENT_BODY,
        ["--path", CHAT + "?cacheBreakpoint=lastUserMessage"],
        {
            "route": "chat",
            "model": "qwen",
            "stream": True,
            "blocks": AGENT_BLOCKS,
            "breakpoints": [_point(0, "1h"), _point(3, "5m"), _point(4, "5m", automatic=True)],
            "telemetry_blocks": [{"where": "messages[0].content[0]", "text_length": len(BILLING)}],
            "prefix_hashes": AGENT_HASHES,
            "forwarded_body_changed": True,
        },
        id="the-body-wins-over-the-query",
    ),
    pytest.param(
        WITHOUT_TOP,
        ["--path", CHAT + "?stream=1&cacheBreakpoint=lastUserMessage"],
        {
            "route": "chat",
            "model": "qwen",
            "stream": True,
            "blocks": AGENT_BLOCKS,
            "breakpoints": [_point(0, "1h"), _point(3, "5m"), _point(4, "1h", automatic=True)],
            "telemetry_blocks": [{"where": "messages[0].content[0]", "text_length": len(BILLING)}],
            "prefix_hashes": AGENT_HASHES,
            "forwarded_body_changed": True,
        },
        id="query-on-an-agent-body",
    ),
]


@pytest.mark.parametrize(("body", "flags", "expected"), EXPLAINED)
def test_explain(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    body: dict[str, Any],
    flags: list[str],
    expected: dict[str, Any],
) -> None:
    code, out, err = _run(tmp_path, capsys, codec.dumps(body), *flags)
    assert (code, err) == (0, "")
    assert codec.loads(out) == expected
    assert out.endswith("}\n")


def test_telemetry_prefixes_none_makes_the_billing_block_content(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(tmp_path, capsys, codec.dumps(AGENT_BODY), "--telemetry-prefixes", "none")
    assert code == 0
    shown = codec.loads(out)
    assert shown["telemetry_blocks"] == []
    assert shown["blocks"][1] == _block(1, "messages[0].content[0]", "system", "text", len(BILLING))
    assert len(shown["prefix_hashes"]) == 6


def test_explain_reads_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(codec.dumps(STRING_BODY)))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["explain"]) == 0
    assert codec.loads(capsys.readouterr().out)["model"] == "qwen"


def _marked(marker: object, **top: Any) -> bytes:
    block = {"type": "text", "text": "a", "cache_control": marker}
    return codec.dumps({"model": "m", "messages": [{"role": "user", "content": [block]}], **top})


def _envelope(
    message: str, code: str = "invalid_cache_control", param: str = "cache_control"
) -> str:
    error = {"message": message, "type": "invalid_request_error", "code": code, "param": param}
    return codec.dumps({"error": error}).decode() + "\n"


EPH = {"type": "ephemeral"}
FOUR = [{"type": "text", "text": str(i), "cache_control": EPH} for i in range(4)]
REJECTED = [
    pytest.param(
        _marked("yes"),
        [],
        _envelope(
            'cache_control must be an object with a string "type": "ephemeral" '
            '(and an optional string "ttl")'
        ),
        id="malformed",
    ),
    pytest.param(
        _marked({"type": "forever"}),
        [],
        _envelope('unsupported cache_control type: "forever" (only "ephemeral")'),
        id="unsupported-type",
    ),
    pytest.param(
        _marked({"type": "ephemeral", "ttl": "7d"}),
        [],
        _envelope('invalid cache_control ttl: "7d"'),
        id="invalid-ttl",
    ),
    pytest.param(
        _marked({"type": "ephemeral", "ttl": "24h"}),
        ["--enabled-ttls", "5m,1h"],
        _envelope(
            "cache_control ttl tier '24h' is not currently available; available tiers: 5m, 1h"
        ),
        id="tier-disabled",
    ),
    pytest.param(
        codec.dumps({"messages": [{"role": "user", "content": [*FOUR, FOUR[0]]}]}),
        [],
        _envelope("too many cache_control breakpoints (max 4)"),
        id="too-many",
    ),
    pytest.param(
        _marked(EPH, cache_control={"type": "ephemeral", "ttl": "1h"}),
        [],
        _envelope(
            "top-level cache_control ttl conflicts with the explicit cache_control "
            "on the last block"
        ),
        id="automatic-conflict",
    ),
    pytest.param(
        codec.dumps({"messages": [{"role": "user", "content": [*FOUR, {"text": "t"}]}]}),
        ["--path", CHAT + "?cacheBreakpoint=lastUserMessage"],
        _envelope("no breakpoint slot left for automatic caching (all 4 used by explicit markers)"),
        id="automatic-no-slot",
    ),
    pytest.param(
        codec.dumps(STRING_BODY),
        ["--path", CHAT + "?cacheBreakpoint=lastUserMessage", "--enabled-ttls", "5m"],
        _envelope("cache_control ttl tier '1h' is not currently available; available tiers: 5m"),
        id="query-needs-1h",
    ),
    pytest.param(
        codec.dumps(STRING_BODY),
        ["--path", CHAT + "?cacheBreakpoint=all"],
        _envelope(
            'invalid cacheBreakpoint value "all"; supported values: "lastUserMessage"',
            "invalid_cache_breakpoint",
            "cacheBreakpoint",
        ),
        id="query-value",
    ),
]


@pytest.mark.parametrize(("body", "flags", "envelope"), REJECTED)
def test_invalid_markers_print_the_envelope_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    body: bytes,
    flags: list[str],
    envelope: str,
) -> None:
    code, out, err = _run(tmp_path, capsys, body, *flags)
    assert (code, out, err) == (2, envelope, "")


def test_unreadable_marked_body_prints_the_envelope(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(tmp_path, capsys, b'{"cache_control":{"type":"ephemeral"},}')
    assert code == 2
    assert codec.loads(out) == {
        "error": {
            "message": "request body is not valid JSON; cache_control markers can only be read "
            "in a valid UTF-8 JSON body",
            "type": "invalid_request_error",
            "code": "unreadable_body",
            "param": None,
        }
    }


FAILURES = [
    pytest.param(b"{not json", [], "input is not a JSON object", id="not-json"),
    pytest.param(b"[1, 2]", [], "input is not a JSON object", id="json-array"),
    pytest.param(
        codec.dumps(STRING_BODY),
        ["--enabled-ttls", "1h", "--default-ttl", "5m"],
        "default tier 5m is not enabled",
        id="default-not-enabled",
    ),
]


@pytest.mark.parametrize(("body", "flags", "message"), FAILURES)
def test_failures_are_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    body: bytes,
    flags: list[str],
    message: str,
) -> None:
    code, out, err = _run(tmp_path, capsys, body, *flags)
    assert (code, out) == (1, "")
    assert err.startswith("extproc: ")
    assert message in err
    assert err.count("\n") == 1


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(tmp_path / "absent.json")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_unknown_tier_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["explain", "--enabled-ttls", "5m,2h"])
    assert caught.value.code == 2
    assert "unknown tier '2h'" in capsys.readouterr().err


# ---- the other routes: --route, --path, or the body's shape ----

MESSAGES_BODY = {
    "model": "claude-local",
    "max_tokens": 64,
    "tools": [{"name": "t", "input_schema": {"type": "object"}}],
    "system": [{"type": "text", "text": "static system", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "hi"}],
}
RESPONSES_BODY = {
    "model": "qwen",
    "instructions": "static system",
    "input": [{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}],
}


@pytest.mark.parametrize(
    ("body", "flags", "route", "wheres"),
    [
        pytest.param(
            MESSAGES_BODY, [], "messages", ["tools[0]", "system[0]", "messages[0].content"],
            id="messages-by-shape",
        ),
        pytest.param(
            RESPONSES_BODY, [], "responses", ["instructions", "input[0].content"],
            id="responses-by-shape",
        ),
        pytest.param(
            RESPONSES_BODY, ["--path", "/openai/v1/responses?x=1"], "responses",
            ["instructions", "input[0].content"], id="responses-by-path",
        ),
        pytest.param(
            STRING_BODY, ["--route", "messages"], "messages", ["messages[0].content",
            "messages[1].content"], id="route-flag-wins",
        ),
    ],
)  # fmt: skip
def test_explain_other_routes(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    body: dict[str, Any],
    flags: list[str],
    route: str,
    wheres: list[str],
) -> None:
    code, out, err = _run(tmp_path, capsys, codec.dumps(body), *flags)
    assert (code, err) == (0, "")
    shown = codec.loads(out)
    assert shown["route"] == route
    assert [b["where"] for b in shown["blocks"]] == wheres
    assert shown["breakpoints"] != [] or route == "messages"


def test_explain_messages_hashes_are_the_shared_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"system": "static system", "messages": [{"role": "user", "content": "hi"}]}
    code, out, _ = _run(tmp_path, capsys, codec.dumps(body))
    assert code == 0
    assert codec.loads(out)["prefix_hashes"] == DESIGN_VECTORS


def test_explain_messages_refusal_is_anthropics_envelope(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    thinking = {"type": "thinking", "thinking": "x", "cache_control": {"type": "ephemeral"}}
    body = {"messages": [{"role": "assistant", "content": [thinking]}]}
    code, out, _ = _run(tmp_path, capsys, codec.dumps(body))
    assert code == 2
    assert codec.loads(out) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": 'cache_control cannot be set on a "thinking" block',
        },
    }


def test_explain_unknown_path_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(tmp_path, capsys, codec.dumps(STRING_BODY), "--path", "/v1/embeddings")
    assert (code, out) == (1, "")
    assert "no route of the sidecar serves '/v1/embeddings'" in err
