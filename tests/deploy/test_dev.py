"""``extproc dev``: the README's one command starts the stack, proves write-then-read, stops."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from asyncio.subprocess import PIPE, STDOUT
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from aiohttp import web

from extproc.commands.dev import (
    DEFAULT_MIN_PREFIX_TOKENS,
    DEFAULT_TOKENIZER,
    prepare_tokenizer,
    redact_password,
)
from extproc.core import codec
from extproc.devtools.devstack import free_port, is_reachable_by, pg_data_dir
from extproc.devtools.quickstart import (
    PATHS,
    NotServed,
    _post,
    curl_command,
    example_body,
    forged_problems,
    stream_usage,
    usage_problems,
)
from extproc.devtools.upstream import UpstreamSettings, bound_port, load_counter, start_upstream
from tests.plugins.metrics import scrape, value

STACK_TIMEOUT_S = 240


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "extproc.cli", "dev", *args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "EXTPROC_DATABASE_URL"}


def test_check_proves_write_then_read(tmp_path: Path) -> None:
    done = subprocess.run(
        _command("--check", "--port", str(free_port())),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=STACK_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "check passed" in done.stdout
    assert not list(tmp_path.iterdir()), "--check leaves nothing behind in the working directory"


async def test_check_through_a_given_upstream(tmp_path: Path) -> None:
    runner = await start_upstream(UpstreamSettings(models=("other",)), "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{bound_port(runner)}"
        argv = _command(
            "--check", "--port", str(free_port()), "--upstream", url, "--model", "other"
        )
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=tmp_path, env=_env(), stdout=PIPE, stderr=STDOUT
        )
        output, _ = await asyncio.wait_for(process.communicate(), STACK_TIMEOUT_S)
    finally:
        await runner.cleanup()
    assert process.returncode == 0, output.decode()
    assert b"check passed" in output


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A work directory PostgreSQL can reach even when it runs as another user (as root)."""
    path = Path(tempfile.mkdtemp(prefix="extproc-dev-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def running_stack(workdir: Path) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    argv = _command("--port", str(free_port()), "--workdir", str(workdir))
    # A session of its own, like a job in a terminal: Ctrl-C reaches its whole process group.
    process = subprocess.Popen(
        argv,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        yield process, lines
    finally:
        # Stop it the way a user would, so it stops its children too; kill only a stuck one.
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.communicate(timeout=STACK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


@pytest.mark.parametrize(
    "signum",
    [
        pytest.param(signal.SIGINT, id="ctrl-c"),
        pytest.param(signal.SIGTERM, id="sigterm"),
    ],
)
def test_signal_stops_every_child(
    running_stack: tuple[subprocess.Popen[str], list[str]], signum: int
) -> None:
    process, lines = running_stack
    assert process.poll() is None, "".join(lines)
    children = _descendants(process.pid)
    names = " ".join(" ".join(c.cmdline()) for c in children)
    assert all(part in names for part in ("envoy", "postgres", "serve", "demo-upstream")), names
    os.killpg(process.pid, signum)
    assert process.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


def test_printed_curl_is_the_example(
    running_stack: tuple[subprocess.Popen[str], list[str]],
) -> None:
    _, lines = running_stack
    text = "".join(lines)
    shown = text[text.index("curl -s") : text.index("Ctrl-C")]
    curls = [shlex.split(block, comments=True) for block in shown.split("\n\n") if block.strip()]
    assert len(curls) == len(PATHS), "one curl per API"
    for words, (api, path) in zip(curls, PATHS.items(), strict=True):
        assert words[:3] == ["curl", "-s", words[2]]
        assert words[2].endswith(path)
        assert codec.loads(words[words.index("-d") + 1]) == example_body("demo", api)


@pytest.mark.parametrize(
    ("first", "second", "problems"),
    [
        pytest.param(
            {"cache_creation_input_tokens": 90, "cache_read_input_tokens": 0},
            {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 90},
            0,
            id="write-then-read",
        ),
        pytest.param(
            {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
            {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
            2,
            id="zero-active",
        ),
        pytest.param({}, {}, 4, id="inactive"),
        pytest.param(
            {"cache_creation_input_tokens": 90, "cache_read_input_tokens": 0},
            {"cache_creation_input_tokens": 90, "cache_read_input_tokens": 0},
            2,
            id="never-read",
        ),
        pytest.param(
            {"cache_creation_input_tokens": 90, "cache_read_input_tokens": 0},
            {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 80},
            1,
            id="partial-read",
        ),
    ],
)
def test_usage_problems(first: dict[str, Any], second: dict[str, Any], problems: int) -> None:
    assert len(usage_problems(first, second)) == problems


def test_example_prefix_passes_the_floor() -> None:
    count = load_counter(prepare_tokenizer(DEFAULT_TOKENIZER))
    system = example_body("demo")["messages"][0]["content"][0]
    assert system["cache_control"]["type"] == "ephemeral"
    assert count(system["text"]) >= DEFAULT_MIN_PREFIX_TOKENS


@pytest.mark.parametrize(
    ("key", "header"),
    [
        pytest.param("sk-dev-abc", "Authorization: Bearer sk-dev-abc", id="literal-key"),
        pytest.param("$EXTPROC_DEV_API_KEY", "Authorization: Bearer secret", id="key-from-env"),
    ],
)
def test_curl_command_quotes_for_the_shell(key: str, header: str) -> None:
    command = curl_command("http://localhost:10000", key, "demo")
    env = {**os.environ, "EXTPROC_DEV_API_KEY": "secret"}
    shown = subprocess.run(
        ["bash", "-c", command.replace("curl -s", "printf '%s\\n'", 1)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert shown[shown.index("-H") + 1] == header
    assert codec.loads(shown[shown.index("-d") + 1]) == example_body("demo")


def test_data_dir_falls_back_when_postgres_cannot_reach_it(workdir: Path) -> None:
    hidden = workdir / "hidden"
    (hidden / "inner").mkdir(parents=True)
    hidden.chmod(0o700)
    assert is_reachable_by(workdir / "data", "nobody")
    assert not is_reachable_by(hidden / "inner" / "data", "nobody")
    assert pg_data_dir(workdir / "data", "nobody") == workdir / "data"
    assert pg_data_dir(workdir / "data", None) == workdir / "data"
    fallback = pg_data_dir(hidden / "inner" / "data", "nobody")
    assert fallback.parent == Path(tempfile.gettempdir())
    assert fallback == pg_data_dir(hidden / "inner" / "data", "nobody")


@pytest.mark.parametrize(
    ("text", "usage"),
    [
        pytest.param(
            'data: {"choices":[1],"usage":null}\n\ndata: {"choices":[],"usage":{"a":1}}\n\n'
            "data: [DONE]\n\n",
            {"a": 1},
            id="usage-after-null",
        ),
        pytest.param('data:{"usage":{"b":2}}\r\n\r\n', {"b": 2}, id="no-space-crlf"),
        pytest.param(': comment\n\ndata: {"choices":[]}\n\ndata: [DONE]\n\n', None, id="none"),
        pytest.param("", None, id="empty"),
    ],
)
def test_stream_usage(text: str, usage: dict[str, int] | None) -> None:
    assert stream_usage(text) == usage


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(
            "postgresql://postgres@127.0.0.1:5432/x",
            "postgresql://postgres@127.0.0.1:5432/x",
            id="no-password",
        ),
        pytest.param(
            "postgresql://u:s3cret@db:5432/x", "postgresql://u:***@db:5432/x", id="password"
        ),
        pytest.param("host=db dbname=x", "host=db dbname=x", id="key-value"),
        pytest.param("host=db password=s3 dbname=x", "host=db password=*** dbname=x", id="kv-pw"),
    ],
)
def test_database_password_is_never_printed(url: str, shown: str) -> None:
    assert redact_password(url) == shown


@pytest.mark.parametrize(
    ("usage", "problems"),
    [
        pytest.param({"cache_read_input_tokens": 0, "cache_creation_input_tokens": 90}, 0,
                     id="own-write"),
        pytest.param({"cache_read_input_tokens": 90, "cache_creation_input_tokens": 0}, 1,
                     id="read-the-victims-cache"),
        pytest.param({}, 1, id="inactive"),
    ],
)  # fmt: skip
def test_forged_problems(usage: dict[str, Any], problems: int) -> None:
    assert len(forged_problems(usage)) == problems


def _records(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    lines = log.read_text(encoding="utf-8").split("\n")[:-1]  # the last one may be partial
    entries = [codec.loads(line) for line in lines if line.strip()]
    return [e["prompt_cache"] for e in entries if e.get("prompt_cache")]


def test_access_log_holds_a_write_then_a_read_of_the_same_size(
    running_stack: tuple[subprocess.Popen[str], list[str]], workdir: Path
) -> None:
    _, lines = running_stack
    text = "".join(lines)
    words = shlex.split(text[text.index("curl -s") : text.index("Ctrl-C")])
    url, body = words[2], words[words.index("-d") + 1]
    headers = dict(h.split(": ", 1) for h in words if h.startswith(("Authorization", "Content")))
    metrics = re.search(r"extproc metrics\s+(\S+)", text)
    assert metrics is not None, text
    log = workdir / "logs" / "access.log"
    records: list[dict[str, Any]] = []
    for sent in range(1, 50):  # the first answer's commit lands after it: repeat until a read
        assert httpx.post(url, content=body, headers=headers, timeout=30).status_code == 200
        for _ in range(600):  # Envoy writes the entry when the request is done, then flushes
            records = _records(log)
            if len(records) >= sent:
                break
            time.sleep(0.05)
        if records and records[-1]["outcome"] == "read":
            break

    write, read = records[0], records[-1]
    assert (write["outcome"], write["commit"]) == ("create_only", "scheduled")
    assert read["outcome"] == "read"
    assert read["read"] == write["creation_5m"] + write["creation_1h"] + write["creation_24h"] > 0
    samples = scrape(metrics.group(1))
    assert value(samples, "extproc_outcomes_total", outcome="create_only") >= 1
    assert value(samples, "extproc_outcomes_total", outcome="read") >= 1


async def test_an_api_the_upstream_does_not_serve_is_named() -> None:
    runner = web.AppRunner(web.Application())  # no routes: every path is a 404
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{bound_port(runner)}"
    try:
        with pytest.raises(NotServed, match=r"does not serve /v1/messages \(HTTP 404\)"):
            await asyncio.to_thread(
                _post, url, example_body("demo", "messages"), "k", None, "messages"
            )
    finally:
        await runner.cleanup()
