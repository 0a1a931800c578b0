"""Settings.from_env: every variable valid and invalid, file merging, all problems at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from extproc.adapters.tokenizers_remote import RemoteTimeouts
from extproc.config import (
    ConfigError,
    HostPort,
    PrincipalKind,
    PrincipalSource,
    Settings,
)
from extproc.core import codec
from extproc.core.classify import EngineCache
from extproc.core.defaults import reply_budget_ms
from extproc.core.model import RequestPolicy, Tier, TierPolicy

DB = "postgresql://extproc@127.0.0.1:5432/extproc"


def settings(**env: str) -> Settings:
    return Settings.from_env({"EXTPROC_DATABASE_URL": DB, **env})


def test_defaults() -> None:
    s = settings()
    assert s == Settings(database_url=DB)
    assert s.listen == "127.0.0.1:50051"
    assert s.tiers == TierPolicy(frozenset(Tier), Tier.M5)
    assert s.principal_source == PrincipalSource(PrincipalKind.API_KEYS)
    assert s.metrics_listen == HostPort("127.0.0.1", 9464)
    assert (s.classify_deadline_ms, s.commit_deadline_ms) == (5000, 2000)
    assert (s.envoy_message_timeout_ms, s.envoy_max_message_timeout_ms) == (2000, 30000)
    assert s.request_policy == RequestPolicy(s.tiers, ("x-anthropic-billing-header:",), True)
    assert s.scrub_provider_cache
    assert s.engine_cache is EngineCache.IGNORE
    assert s.tokenizer_timeout_ms == 1000
    assert s.max_body_bytes == 8 << 20
    assert s.grpc_message_limit > s.max_body_bytes
    assert (s.shutdown_grace_s, s.workers, s.log_level) == (20.0, 1, "INFO")
    assert (s.index_memo_ttl_s, s.index_memo_size, s.refresh_debounce_pct) == (2.0, 10_000, 10)
    assert (s.stale_for_s, s.breaker_failures, s.breaker_cooldown_s) == (60.0, 5, 2.0)
    assert s.tokenizer_queue == 64


VALID = [
    pytest.param("LISTEN", "0.0.0.0:6000", "listen", "0.0.0.0:6000", id="listen-tcp"),
    pytest.param("LISTEN", "[::1]:6000", "listen", "[::1]:6000", id="listen-ipv6"),
    pytest.param("LISTEN", "localhost:0", "listen", "localhost:0", id="listen-port-0"),
    pytest.param("LISTEN", "unix:/run/extproc.sock", "listen", "unix:/run/extproc.sock", id="unix"),
    pytest.param("DATABASE_URL", "postgres://u@h/d", "database_url", "postgres://u@h/d", id="db"),
    pytest.param("DATABASE_URL", "host=/tmp dbname=x", "database_url", "host=/tmp dbname=x",
                 id="db-kv"),
    pytest.param(
        "ENABLED_TTLS", "5m, 1h", "tiers", TierPolicy(frozenset({Tier.M5, Tier.H1})), id="ttls"
    ),
    pytest.param("PRINCIPAL_SOURCE", "key_hash", "principal_source",
                 PrincipalSource(PrincipalKind.KEY_HASH), id="principal-key-hash"),
    pytest.param("PRINCIPAL_SOURCE", "header:X-Tenant-Id", "principal_source",
                 PrincipalSource(PrincipalKind.HEADER, "x-tenant-id"), id="principal-header"),
    pytest.param("TOKENIZER_URL", "http://127.0.0.1:8100", "tokenizer_url",
                 "http://127.0.0.1:8100", id="tokenizer-url"),
    pytest.param("TOKENIZERS", "qwen=/t/q.json, mistral = /t/m.json", "tokenizers",
                 (("qwen", "/t/q.json"), ("mistral", "/t/m.json")), id="tokenizer-files"),
    pytest.param("TOKENIZERS", '{"qwen": "/t/q.json"}', "tokenizers",
                 (("qwen", "/t/q.json"),), id="tokenizer-files-json"),
    pytest.param("TOKENIZER_TIMEOUT_MS", "2500", "tokenizer_timeout_ms", 2500, id="tokenizer-ms"),
    pytest.param("CLASSIFY_DEADLINE_MS", "1500", "classify_deadline_ms", 1500, id="classify-ms"),
    pytest.param("COMMIT_DEADLINE_MS", "5_000", "commit_deadline_ms", 5000, id="commit-ms"),
    pytest.param("MAX_BODY_BYTES", "16MiB", "max_body_bytes", 16 << 20, id="body-mib"),
    pytest.param("MAX_BODY_BYTES", "65536", "max_body_bytes", 65536, id="body-bytes"),
    pytest.param("METRICS_LISTEN", "off", "metrics_listen", None, id="metrics-off"),
    pytest.param("METRICS_LISTEN", "0.0.0.0:9000", "metrics_listen", HostPort("0.0.0.0", 9000),
                 id="metrics-addr"),
    pytest.param("SHUTDOWN_GRACE_S", "2.5", "shutdown_grace_s", 2.5, id="grace"),
    pytest.param("WORKERS", "4", "workers", 4, id="workers"),
    pytest.param("LOG_LEVEL", "debug", "log_level", "DEBUG", id="log-level"),
    pytest.param("SWEEP_INTERVAL_S", "0", "sweep_interval_s", 0.0, id="sweep-off"),
    pytest.param("TELEMETRY_PREFIXES", "x-billing:, x-trace: ", "telemetry_prefixes",
                 ("x-billing:", "x-trace:"), id="telemetry-prefixes"),
    pytest.param("TELEMETRY_PREFIXES", "none", "telemetry_prefixes", (), id="telemetry-none"),
    pytest.param("TELEMETRY_STRIP", "false", "telemetry_strip", False, id="telemetry-kept"),
    pytest.param("TELEMETRY_STRIP", "ON", "telemetry_strip", True, id="telemetry-strip-on"),
    pytest.param("SCRUB_PROVIDER_CACHE", "0", "scrub_provider_cache", False, id="scrub-off"),
    pytest.param("ENGINE_CACHE", "report", "engine_cache", EngineCache.REPORT, id="engine"),
    pytest.param("ENVOY_MESSAGE_TIMEOUT_MS", "500", "envoy_message_timeout_ms", 500,
                 id="envoy-timeout"),
    pytest.param("ENVOY_MAX_MESSAGE_TIMEOUT_MS", "60000", "envoy_max_message_timeout_ms", 60000,
                 id="envoy-max-timeout"),
    pytest.param("INDEX_MEMO_TTL_S", "0", "index_memo_ttl_s", 0.0, id="index-memo-off"),
    pytest.param("INDEX_MEMO_SIZE", "500", "index_memo_size", 500, id="index-memo-size"),
    pytest.param("REFRESH_DEBOUNCE_PCT", "0", "refresh_debounce_pct", 0, id="debounce-off"),
    pytest.param("STALE_FOR_S", "300", "stale_for_s", 300.0, id="stale-for"),
    pytest.param("BREAKER_FAILURES", "3", "breaker_failures", 3, id="breaker-failures"),
    pytest.param("BREAKER_COOLDOWN_S", "0.5", "breaker_cooldown_s", 0.5, id="breaker-cooldown"),
    pytest.param("TOKENIZER_QUEUE", "0", "tokenizer_queue", 0, id="tokenizer-queue-none"),
]  # fmt: skip


@pytest.mark.parametrize(("var", "text", "attr", "expected"), VALID)
def test_valid_value(var: str, text: str, attr: str, expected: Any) -> None:
    assert getattr(settings(**{f"EXTPROC_{var}": text}), attr) == expected


INVALID = [
    pytest.param("LISTEN", "50051", id="listen-no-host"),
    pytest.param("LISTEN", "host:99999", id="listen-port-range"),
    pytest.param("LISTEN", "unix:", id="listen-empty-unix"),
    pytest.param("DATABASE_URL", "mysql://x", id="db-scheme"),
    pytest.param("ENABLED_TTLS", "5m,2h", id="ttls-unknown"),
    pytest.param("ENABLED_TTLS", ",", id="ttls-empty"),
    pytest.param("DEFAULT_TTL", "7d", id="default-unknown"),
    pytest.param("PRINCIPAL_SOURCE", "ldap", id="principal-unknown"),
    pytest.param("PRINCIPAL_SOURCE", "header:", id="principal-header-empty"),
    pytest.param("PRINCIPAL_SOURCE", "header:bad name", id="principal-header-bad"),
    pytest.param("TOKENIZER_URL", "ftp://x", id="tokenizer-url-scheme"),
    pytest.param("TOKENIZER_URL", "http://", id="tokenizer-url-no-host"),
    pytest.param("TOKENIZER_URL", "http://tok:port/", id="tokenizer-url-bad-port"),
    pytest.param("TOKENIZERS", "qwen", id="tokenizers-no-path"),
    pytest.param("TOKENIZERS", "a=/x,a=/y", id="tokenizers-duplicate"),
    pytest.param("TOKENIZER_TIMEOUT_MS", "slow", id="tokenizer-timeout-not-int"),
    pytest.param("TOKENIZER_TIMEOUT_MS", "0", id="tokenizer-timeout-zero"),
    pytest.param("TOKENIZER_TIMEOUT_MS", "60001", id="tokenizer-timeout-too-long"),
    pytest.param("CLASSIFY_DEADLINE_MS", "fast", id="classify-not-int"),
    pytest.param("CLASSIFY_DEADLINE_MS", "0", id="classify-zero"),
    pytest.param("COMMIT_DEADLINE_MS", "-1", id="commit-negative"),
    pytest.param("MAX_BODY_BYTES", "8 parsecs", id="body-unit"),
    pytest.param("MAX_BODY_BYTES", "10", id="body-too-small"),
    pytest.param("METRICS_LISTEN", "on", id="metrics-bad"),
    pytest.param("SHUTDOWN_GRACE_S", "soon", id="grace-not-number"),
    pytest.param("WORKERS", "0", id="workers-zero"),
    pytest.param("WORKERS", "automatic", id="workers-neither-number-nor-auto"),
    pytest.param("LOG_LEVEL", "chatty", id="log-level"),
    pytest.param("SWEEP_INTERVAL_S", "-5", id="sweep-negative"),
    pytest.param("TELEMETRY_PREFIXES", ",", id="telemetry-empty-list"),
    pytest.param("TELEMETRY_STRIP", "maybe", id="telemetry-strip-not-bool"),
    pytest.param("SCRUB_PROVIDER_CACHE", "2", id="scrub-not-bool"),
    pytest.param("ENGINE_CACHE", "trust", id="engine-unknown"),
    pytest.param("ENVOY_MESSAGE_TIMEOUT_MS", "0", id="envoy-timeout-zero"),
    pytest.param("INDEX_MEMO_TTL_S", "61", id="index-memo-ttl-too-long"),
    pytest.param("INDEX_MEMO_SIZE", "0", id="index-memo-no-room"),
    pytest.param("REFRESH_DEBOUNCE_PCT", "51", id="debounce-over-half"),
    pytest.param("STALE_FOR_S", "-1", id="stale-negative"),
    pytest.param("BREAKER_FAILURES", "0", id="breaker-never-opens"),
    pytest.param("BREAKER_COOLDOWN_S", "forever", id="breaker-cooldown-not-number"),
    pytest.param("TOKENIZER_QUEUE", "-1", id="tokenizer-queue-negative"),
]


@pytest.mark.parametrize(("var", "text"), INVALID)
def test_invalid_value(var: str, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(**{f"EXTPROC_{var}": text})
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"EXTPROC_{var}=")


def test_database_url_required_and_never_echoed() -> None:
    with pytest.raises(ConfigError, match="EXTPROC_DATABASE_URL"):
        Settings.from_env({})
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"EXTPROC_DATABASE_URL": "mysql://user:s3cret@db/x"})
    assert "s3cret" not in str(caught.value)


def test_default_ttl_must_be_enabled() -> None:
    with pytest.raises(ConfigError, match="EXTPROC_DEFAULT_TTL='24h': not among"):
        settings(EXTPROC_ENABLED_TTLS="5m,1h", EXTPROC_DEFAULT_TTL="24h")


def test_every_problem_reported_at_once() -> None:
    env = {
        "EXTPROC_LISTEN": "nowhere",
        "EXTPROC_WORKERS": "many",
        "EXTPROC_LOG_LEVEL": "loud",
        "EXTPROC_ENABLED_TTLS": "1w",
    }
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    names = sorted(p.split("=", 1)[0] for p in caught.value.problems)
    assert names == [
        "EXTPROC_DATABASE_URL",
        "EXTPROC_ENABLED_TTLS",
        "EXTPROC_LISTEN",
        "EXTPROC_LOG_LEVEL",
        "EXTPROC_WORKERS",
    ]


@pytest.mark.parametrize(
    "listen", [pytest.param("unix:/run/x.sock", id="unix"), pytest.param("h:0", id="port-0")]
)
def test_workers_need_a_fixed_tcp_port(listen: str) -> None:
    with pytest.raises(ConfigError, match="EXTPROC_WORKERS=2: several workers"):
        settings(EXTPROC_WORKERS="2", EXTPROC_LISTEN=listen)


@pytest.mark.parametrize(
    ("cpus", "listen", "workers"),
    [
        pytest.param(4, "127.0.0.1:50051", 4, id="four-cpus"),
        pytest.param(1, "unix:/run/x.sock", 1, id="one-cpu-on-a-unix-socket"),
        pytest.param(1000, "127.0.0.1:50051", 256, id="capped"),
    ],
)
def test_workers_auto_is_the_usable_cpus(
    monkeypatch: pytest.MonkeyPatch, cpus: int, listen: str, workers: int
) -> None:
    monkeypatch.setattr("extproc.config.usable_cpus", lambda: cpus)
    assert settings(EXTPROC_WORKERS="Auto", EXTPROC_LISTEN=listen).workers == workers


def test_workers_auto_with_several_cpus_needs_a_fixed_tcp_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("extproc.config.usable_cpus", lambda: 4)
    with pytest.raises(ConfigError, match=r"EXTPROC_WORKERS=auto \(4 CPUs\): several workers"):
        settings(EXTPROC_WORKERS="auto", EXTPROC_LISTEN="unix:/run/x.sock")


def test_empty_variable_means_default() -> None:
    assert settings(EXTPROC_LISTEN="  ").listen == "127.0.0.1:50051"


def test_file_values_and_env_wins(tmp_path: Path) -> None:
    path = tmp_path / "extproc.toml"
    path.write_text(
        f'database_url = "{DB}"\nworkers = 3\nenabled_ttls = ["5m", "1h"]\n'
        'extproc_log_level = "warning"\n[tokenizers]\nqwen = "/t/q.json"\n'
    )
    s = Settings.from_env({"EXTPROC_WORKERS": "2"}, path)
    assert (s.database_url, s.workers, s.log_level) == (DB, 2, "WARNING")
    assert s.tiers.enabled == frozenset({Tier.M5, Tier.H1})
    assert s.tokenizers == (("qwen", "/t/q.json"),)


def test_file_named_by_env(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'database_url = "{DB}"\n')
    assert Settings.from_env({"EXTPROC_CONFIG_FILE": str(path)}).database_url == DB


FILE_PROBLEMS = [
    pytest.param("workers = \n", "not valid TOML", id="bad-toml"),
    pytest.param('colour = "blue"\n', "unknown key 'colour'", id="unknown-key"),
]


@pytest.mark.parametrize(("text", "message"), FILE_PROBLEMS)
def test_file_problems(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"EXTPROC_DATABASE_URL": DB}, path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.from_env({"EXTPROC_DATABASE_URL": DB}, tmp_path / "absent.toml")


def test_serve_reports_every_problem_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from extproc.cli import main

    for name in [k for k in os.environ if k.startswith("EXTPROC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("EXTPROC_WORKERS", "none")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "EXTPROC_DATABASE_URL" in err
    assert "EXTPROC_WORKERS='none': expected an integer" in err


def test_serve_check_prints_settings_without_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from extproc.cli import main

    for name in [k for k in os.environ if k.startswith("EXTPROC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("EXTPROC_DATABASE_URL", "postgresql://u:s3cret@db:5432/x?password=p")
    monkeypatch.setenv("EXTPROC_ENABLED_TTLS", "1h,5m")
    assert main(["serve", "--check"]) == 0
    out = capsys.readouterr().out
    shown = codec.loads(out)
    assert shown["database"] == "postgresql://db:5432/x"
    assert shown["enabled_ttls"] == ["5m", "1h"]
    assert "s3cret" not in out
    assert shown["tokenizer_timeout_ms"] == 1000


@pytest.mark.parametrize(
    ("millis", "expected"),
    [
        pytest.param("300", RemoteTimeouts(connect=0.3, total=0.3), id="shorter-than-connect"),
        pytest.param("2500", RemoteTimeouts(connect=1.0, total=2.5), id="longer-than-connect"),
    ],
)
def test_tokenizer_timeout_reaches_the_service_client(
    millis: str, expected: RemoteTimeouts
) -> None:
    from extproc.app import tokenizer_timeouts

    assert tokenizer_timeouts(settings(EXTPROC_TOKENIZER_TIMEOUT_MS=millis)) == expected


DEADLINES = [
    pytest.param({"CLASSIFY_DEADLINE_MS": "1500"}, True, id="fits-envoys-timeout"),
    pytest.param({"CLASSIFY_DEADLINE_MS": "5000"}, True, id="extends-envoys-timeout"),
    pytest.param({"CLASSIFY_DEADLINE_MS": "29500"}, True, id="just-under-the-ceiling"),
    pytest.param({"CLASSIFY_DEADLINE_MS": "29600"}, False, id="over-the-ceiling-with-margin"),
    pytest.param(
        {"CLASSIFY_DEADLINE_MS": "5000", "ENVOY_MAX_MESSAGE_TIMEOUT_MS": "0"},
        False,
        id="envoy-allows-no-extension",
    ),
    pytest.param(
        {"CLASSIFY_DEADLINE_MS": "100", "ENVOY_MAX_MESSAGE_TIMEOUT_MS": "0"},
        True,
        id="no-extension-needed",
    ),
]


@pytest.mark.parametrize(("env", "valid"), DEADLINES)
def test_classify_deadline_must_fit_what_envoy_lets_a_reply_wait(
    env: dict[str, str], valid: bool
) -> None:
    prefixed = {f"EXTPROC_{k}": v for k, v in env.items()}
    if valid:
        settings(**prefixed)
        return
    with pytest.raises(ConfigError, match=r"EXTPROC_CLASSIFY_DEADLINE_MS.*max_message_timeout"):
        settings(**prefixed)


@pytest.mark.parametrize(
    ("timeout_ms", "budget_ms"),
    [
        pytest.param(200, 100, id="200ms"),
        pytest.param(2000, 1500, id="2s"),
        pytest.param(100, 0, id="100ms"),
    ],
)
def test_reply_budget_leaves_a_margin(timeout_ms: int, budget_ms: int) -> None:
    assert reply_budget_ms(timeout_ms) == budget_ms
