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


STRING_BODY = {
    "model": "qwen",
    "messages": [
        {"role": "system", "content": "static system"},
        {"role": "user", "content": "hi"},
    ],
}
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

EXPLAINED = [
    pytest.param(
        STRING_BODY,
        [],
        {
            "model": "qwen",
            "stream": False,
            "blocks": [
                {"index": 0, "role": "system", "kind": "text", "text_length": 13},
                {"index": 1, "role": "user", "kind": "text", "text_length": 2},
            ],
            "breakpoints": [],
            "prefix_hashes": [
                "3f64b6de25662606fce3fdbfc38c06d90282a10f28a6a12496225051481cf3e2",
                "b063c46136d7e666f8ff6dfbb59370f23dd93a60e692faceb73da98351330939",
            ],
            "forwarded_body_changed": False,
        },
        id="string-content",
    ),
    pytest.param(
        ARRAY_BODY,
        ["--default-ttl", "24h"],
        {
            "model": "qwen",
            "stream": True,
            "blocks": [
                {"index": 0, "role": "system", "kind": "text", "text_length": 11},
                {"index": 1, "role": "user", "kind": "image_url", "text_length": 0},
                {"index": 2, "role": "user", "kind": "text", "text_length": 3},
                {"index": 3, "role": "user", "kind": "text", "text_length": 4},
            ],
            "breakpoints": [{"block": 0, "ttl": "1h"}, {"block": 2, "ttl": "24h"}],
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


def test_explain_reads_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(codec.dumps(STRING_BODY)))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["explain"]) == 0
    assert codec.loads(capsys.readouterr().out)["model"] == "qwen"


def _marked(marker: object) -> bytes:
    block = {"type": "text", "text": "a", "cache_control": marker}
    return codec.dumps({"model": "m", "messages": [{"role": "user", "content": [block]}]})


REJECTED = [
    pytest.param(_marked("yes"), [], "malformed_cache_control", id="malformed"),
    pytest.param(_marked({"type": "forever"}), [], "unsupported_type", id="unsupported-type"),
    pytest.param(_marked({"type": "ephemeral", "ttl": "7d"}), [], "invalid_ttl", id="invalid-ttl"),
    pytest.param(
        _marked({"type": "ephemeral", "ttl": "24h"}),
        ["--enabled-ttls", "5m,1h"],
        "tier_disabled",
        id="tier-disabled",
    ),
]


@pytest.mark.parametrize(("body", "flags", "reason"), REJECTED)
def test_invalid_markers_print_envelope(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    body: bytes,
    flags: list[str],
    reason: str,
) -> None:
    code, out, _ = _run(tmp_path, capsys, body, *flags)
    assert code == 2
    error = codec.loads(out)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_cache_control"
    assert error["param"] == "messages[].content[].cache_control"
    assert error["message"].startswith(f"{reason}: ")


def test_tier_disabled_lists_available(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = _marked({"type": "ephemeral", "ttl": "24h"})
    _, out, _ = _run(tmp_path, capsys, body, "--enabled-ttls", "5m,1h")
    assert "available tiers: 5m, 1h" in codec.loads(out)["error"]["message"]


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
