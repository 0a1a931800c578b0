"""``extproc serve --check``: a warning when clients could set the principal (``--envoy-config``),
and what the OTEL_* variables configure for traces."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from extproc.cli import main
from extproc.core import codec
from extproc.devtools.envoyconf import EnvoyOptions, render

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "envoy" / "envoy.yaml"
ISTIO = ROOT / "deploy" / "istio" / "envoyfilter.yaml"
GATEWAY = ROOT / "deploy" / "envoy-gateway" / "extension-policy.yaml"
Check = Callable[..., tuple[int, str, str]]


@pytest.fixture
def check(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Check:
    """Runs ``extproc serve --check`` for a principal source: exit code, stdout, stderr."""
    for name in [k for k in os.environ if k.startswith("EXTPROC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("EXTPROC_DATABASE_URL", "postgresql://extproc@db:5432/extproc")

    def run(source: str, *configs: Path) -> tuple[int, str, str]:
        monkeypatch.setenv("EXTPROC_PRINCIPAL_SOURCE", source)
        argv = ["serve", "--check"]
        for config in configs:
            argv += ["--envoy-config", str(config)]
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.parametrize(
    "config",
    [pytest.param(BOOTSTRAP, id="bootstrap"), pytest.param(ISTIO, id="istio"),
     pytest.param(GATEWAY, id="envoy-gateway")],
)  # fmt: skip
def test_agreeing_configuration_is_quiet(check: Check, config: Path) -> None:
    code, out, err = check("header:x-extproc-principal", config)
    assert (code, err) == (0, "")
    assert codec.loads(out)["principal_source"] == "header:x-extproc-principal"


def test_disagreement_is_a_warning_not_a_failure(check: Check) -> None:
    code, out, err = check("header:X-Tenant", BOOTSTRAP, ISTIO)
    assert code == 0
    assert codec.loads(out)["principal_source"] == "header:x-tenant"
    warnings = err.splitlines()
    assert len(warnings) == 2
    for line, path in zip(warnings, (BOOTSTRAP, ISTIO), strict=True):
        assert line.startswith("extproc serve: warning: EXTPROC_PRINCIPAL_SOURCE=header:x-tenant")
        assert f"{path} does not remove a client's x-tenant" in line
        assert "(it removes: x-extproc-principal)" in line
        assert "--principal-header x-tenant" in line


def test_a_rendered_bootstrap_for_the_name_agrees(check: Check, tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(render(EnvoyOptions(principal_header="x-tenant")))
    assert check("header:x-tenant", config)[::2] == (0, "")


def test_without_an_envoy_config_it_says_what_it_did_not_check(
    check: Check,
) -> None:
    code, _, err = check("header:x-tenant")
    assert code == 0
    assert err.startswith("extproc serve: note: not compared with an Envoy configuration")
    assert "remove every client copy of x-tenant before the ext_proc filter" in err


@pytest.mark.parametrize("source", [pytest.param("api_keys"), pytest.param("key_hash")])
def test_sources_without_a_header_need_no_stripping(check: Check, source: str) -> None:
    assert check(source)[::2] == (0, "")


def test_an_unreadable_envoy_config_exits_2(check: Check, tmp_path: Path) -> None:
    code, out, err = check("header:x-tenant", tmp_path / "absent.yaml")
    assert (code, out) == (2, "")
    assert "--envoy-config" in err
    assert "cannot read" in err


@pytest.fixture
def no_otel(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_traces_are_off_unless_configured(check: Check, no_otel: pytest.MonkeyPatch) -> None:
    code, out, _ = check("api_keys")
    assert (code, codec.loads(out)["traces"]) == (0, "off")


def test_configured_traces_are_described_without_credentials(
    check: Check, no_otel: pytest.MonkeyPatch
) -> None:
    no_otel.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://user:secret@collector:4318/?key=abc123")
    no_otel.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer very-secret")
    code, out, _ = check("api_keys")
    assert code == 0
    assert codec.loads(out)["traces"] == {
        "protocol": "http/protobuf",
        "endpoint": "https://collector:4318/",
        "exporter": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    }
    assert "secret" not in out
    assert "abc123" not in out


def test_traces_that_cannot_be_sent_fail_the_check(
    check: Check, no_otel: pytest.MonkeyPatch
) -> None:
    no_otel.setenv("OTEL_TRACES_EXPORTER", "otlp")
    no_otel.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "smoke-signals")
    code, out, err = check("api_keys")
    assert (code, out) == (2, "")
    assert "OTLP protocol 'smoke-signals'" in err
