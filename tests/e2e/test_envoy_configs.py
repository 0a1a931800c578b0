"""Every shipped and rendered Envoy bootstrap passes ``envoy --mode validate`` and they agree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import Settings
from extproc.devtools.envoyconf import (
    EnvoyConfError,
    EnvoyOptions,
    Layout,
    fail_open_text,
    render,
    template_text,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "envoy").glob("*.yaml"))
ENVOY = shutil.which("envoy") or str(Path(sys.executable).with_name("envoy"))

pytestmark = pytest.mark.e2e

RENDERED = [
    pytest.param(EnvoyOptions(), id="defaults"),
    pytest.param(EnvoyOptions(fail_open=True), id="fail-open"),
    pytest.param(
        EnvoyOptions(listen_host="127.0.0.1", listen_port=0, admin_port=0), id="ephemeral-ports"
    ),
    pytest.param(EnvoyOptions(extproc_address="unix:/run/extproc/extproc.sock"), id="unix-socket"),
    pytest.param(EnvoyOptions(extproc_address="[::1]:50051"), id="ipv6-extproc"),
    pytest.param(EnvoyOptions(upstream_url="https://api.example.com"), id="tls-named-upstream"),
    pytest.param(EnvoyOptions(upstream_url="http://vllm:8000"), id="named-upstream"),
    pytest.param(EnvoyOptions(max_body_bytes=64 << 20, classify_deadline_ms=5000), id="big-limits"),
    pytest.param(EnvoyOptions(principal_header="X-Tenant~Id"), id="principal-header"),
]


def _validate(path: Path) -> None:
    done = subprocess.run(
        [ENVOY, "--mode", "validate", "--disable-hot-restart", "-l", "error", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in SHIPPED])
def test_shipped_config_validates(path: Path) -> None:
    _validate(path)


@pytest.mark.parametrize("options", RENDERED)
def test_rendered_config_validates(options: EnvoyOptions, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(render(options))
    _validate(path)


def test_top_level_config_is_the_packaged_one() -> None:
    assert (ROOT / "envoy" / "envoy.yaml").read_text() == template_text()


def test_fail_open_file_is_derived_from_the_main_one() -> None:
    assert (ROOT / "envoy" / "envoy-fail-open.yaml").read_text() == fail_open_text(template_text())


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [path]


def _ext_proc(config: dict[str, Any]) -> dict[str, Any]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    found: dict[str, Any] = next(f for f in filters if f["name"] == "envoy.filters.http.ext_proc")
    return found["typed_config"]


def test_fail_open_differs_only_in_failure_mode() -> None:
    closed = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    opened = yaml.safe_load((ROOT / "envoy" / "envoy-fail-open.yaml").read_text())
    assert _ext_proc(closed)["failure_mode_allow"] is False
    assert _ext_proc(opened)["failure_mode_allow"] is True
    assert len(_differences(closed, opened)) == 1


def test_rendering_defaults_changes_nothing_but_comments() -> None:
    assert yaml.safe_load(render(EnvoyOptions())) == yaml.safe_load(template_text())


def test_rendered_limits_follow_the_body_limit() -> None:
    config = yaml.safe_load(render(EnvoyOptions(max_body_bytes=300_000, classify_deadline_ms=4500)))
    listener = config["static_resources"]["listeners"][0]
    routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    limits = [
        r["request_body_buffer_limit"]
        for r in routes["virtual_hosts"][0]["routes"]
        if "request_body_buffer_limit" in r
    ]
    assert listener["per_connection_buffer_limit_bytes"] == 300_000
    assert limits == [300_000] * 5  # the chat routes (the breakpoint one too), messages, responses
    assert _ext_proc(config)["message_timeout"] == "2s"
    assert _ext_proc(config)["max_message_timeout"] == "30s"


@pytest.mark.parametrize(
    ("options", "timeout", "ceiling"),
    [
        pytest.param(EnvoyOptions(), "2s", "30s", id="defaults"),
        pytest.param(EnvoyOptions(message_timeout_ms=500), "0.500s", "30s", id="short-timeout"),
        pytest.param(EnvoyOptions(classify_deadline_ms=40_000), "2s", "41s", id="long-deadline"),
    ],
)
def test_rendered_message_timeouts_let_the_server_extend_its_replies(
    options: EnvoyOptions, timeout: str, ceiling: str
) -> None:
    ext_proc = _ext_proc(yaml.safe_load(render(options)))
    assert (ext_proc["message_timeout"], ext_proc["max_message_timeout"]) == (timeout, ceiling)
    env = options.server_env()
    server = Settings.from_env({**env, "EXTPROC_DATABASE_URL": "postgresql://x@db/x"})
    assert server.envoy_message_timeout_ms == options.message_timeout_ms
    assert server.envoy_max_message_timeout_ms == options.max_message_timeout_ms


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(EnvoyOptions(upstream_url="ftp://x"), id="bad-upstream-scheme"),
        pytest.param(EnvoyOptions(upstream_url="http://x/v1"), id="upstream-with-path"),
        pytest.param(EnvoyOptions(extproc_address="localhost"), id="extproc-without-port"),
        pytest.param(EnvoyOptions(extproc_address="unix:"), id="empty-unix-path"),
        pytest.param(EnvoyOptions(principal_header="x tenant"), id="principal-header-not-a-name"),
        pytest.param(EnvoyOptions(principal_header="authorization"), id="principal-header-unsafe"),
    ],
)
def test_render_refuses_what_envoy_cannot_express(options: EnvoyOptions) -> None:
    with pytest.raises(EnvoyConfError):
        render(options)


def _early_removals(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (early,) = hcm["typed_config"]["early_header_mutation_extensions"]
    mutations: list[dict[str, Any]] = early["typed_config"]["mutations"]
    return mutations


@pytest.mark.parametrize(
    ("options", "removed"),
    [
        pytest.param(EnvoyOptions(), "x-extproc-principal", id="default"),
        pytest.param(EnvoyOptions(principal_header=" X-Tenant~Id "), "x-tenant~id", id="chosen"),
    ],
)
def test_render_strips_the_principal_header_it_is_given(
    options: EnvoyOptions, removed: str
) -> None:
    assert _early_removals(yaml.safe_load(render(options))) == [{"remove": removed}]


def _render_command(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "extproc.devtools.envoyconf", "render", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_render_command_takes_the_principal_header() -> None:
    done = _render_command("--principal-header", "x-org")
    assert done.returncode == 0, done.stderr
    assert _early_removals(yaml.safe_load(done.stdout)) == [{"remove": "x-org"}]
    refused = _render_command("--principal-header", "host")
    assert refused.returncode == 2
    assert "principal header: 'host' cannot carry the principal" in refused.stderr


OVERRIDES = [
    pytest.param("BUFFERED", "SEND", id="json-answer"),
    pytest.param("STREAMED", "SEND", id="sse-answer"),
    pytest.param("NONE", "SKIP", id="not-a-chat-request"),
]


@pytest.mark.parametrize(("response_body", "response_header"), OVERRIDES)
def test_allowed_override_modes_are_complete_tuples(
    response_body: str, response_header: str
) -> None:
    allowed = _ext_proc(yaml.safe_load(template_text()))["allowed_override_modes"]
    expected = {
        "request_body_mode": "NONE",
        "response_header_mode": response_header,
        "response_body_mode": response_body,
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }
    assert expected in allowed


@pytest.mark.parametrize(
    ("layout", "request_headers", "response_headers", "response_body"),
    [
        pytest.param(Layout.BODY_FIRST, "SKIP", "SEND", "NONE", id="body-first"),
        pytest.param(Layout.HEADERS_FIRST, "SEND", "SEND", "NONE", id="headers-first"),
        pytest.param(Layout.STREAMED, "SKIP", "SKIP", "STREAMED", id="streamed"),
    ],
)
def test_layouts_set_the_processing_modes(
    layout: Layout, request_headers: str, response_headers: str, response_body: str
) -> None:
    config = yaml.safe_load(render(EnvoyOptions(layout=layout, principal_header="x-tenant")))
    ext_proc = _ext_proc(config)
    mode = ext_proc["processing_mode"]
    assert (mode["request_header_mode"], mode["response_header_mode"]) == (
        request_headers,
        response_headers,
    )
    assert mode["response_body_mode"] == response_body
    assert "request.headers['x-tenant']" in ext_proc["request_attributes"]
    assert "request.headers['authorization']" in ext_proc["request_attributes"]
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    (breakpoint_route,) = [r for r in routes if r["name"] == "chat_completions_breakpoint"]
    override = breakpoint_route["typed_per_filter_config"]["envoy.filters.http.ext_proc"]
    assert override["overrides"]["processing_mode"]["request_header_mode"] == "SEND"
