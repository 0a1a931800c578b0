"""One rule for principal sources: parser, config validation and start-up agree on every name."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from extproc.adapters.telemetry import start_metrics
from extproc.app import App
from extproc.config import ConfigError, Settings
from extproc.principals import (
    HeaderName,
    PrincipalKind,
    PrincipalSource,
    parse_principal_source,
)
from tests.adapters.test_postgres_resolvers import enable
from tests.adapters.test_servicer import JSON_ANSWER, MARKED, common, health_of
from tests.plugins.grpc_server import MODEL, EnvoySide, bearer


def header(name: str) -> PrincipalSource:
    return PrincipalSource(PrincipalKind.HEADER, HeaderName(name))


ACCEPTED_HEADERS = [
    pytest.param("header:x-extproc-principal", header("x-extproc-principal"), id="default"),
    pytest.param("header:X-Tenant-Id", header("x-tenant-id"), id="lower-cased"),
    pytest.param("  header: x-tenant  ", header("x-tenant"), id="whitespace-trimmed"),
    pytest.param("header:x-tenant~id", header("x-tenant~id"), id="tilde"),
    pytest.param("header:x_tenant", header("x_tenant"), id="underscore"),
    pytest.param("header:x-auth-request-user", header("x-auth-request-user"), id="oauth2-proxy"),
    pytest.param("header:x-forwarded-user", header("x-forwarded-user"), id="forwarded-user"),
    pytest.param("header:tenant.id'2", header("tenant.id'2"), id="dot-and-quote"),
]
ACCEPTED = [
    pytest.param("api_keys", PrincipalSource(PrincipalKind.API_KEYS), id="api-keys"),
    pytest.param("key_hash", PrincipalSource(PrincipalKind.KEY_HASH), id="key-hash"),
    *ACCEPTED_HEADERS,
]

REFUSED = [
    pytest.param("", "expected api_keys, key_hash or header:<name>", id="empty"),
    pytest.param("apikeys", "expected api_keys", id="misspelt"),
    pytest.param("Header:x-tenant", "expected api_keys", id="kind-is-case-sensitive"),
    pytest.param("key_hash:x", "expected api_keys", id="other-kind-with-name"),
    pytest.param("header", "header needs a name", id="header-without-colon"),
    pytest.param("header:", "needs a header name", id="header-without-name"),
    pytest.param("header:x tenant", "not an HTTP header name", id="space"),
    pytest.param("header:x-tenant@id", "not an HTTP header name", id="at-sign"),
    pytest.param("header:x-ténant", "not an HTTP header name", id="non-ascii"),
    pytest.param("header:x-tenant:id", "not an HTTP header name", id="colon"),
    pytest.param("header::authority", "pseudo-header", id="pseudo-authority"),
    pytest.param("header::path", "pseudo-header", id="pseudo-path"),
    pytest.param("header:connection", "hop-by-hop", id="connection"),
    pytest.param("header:Transfer-Encoding", "hop-by-hop", id="transfer-encoding"),
    pytest.param("header:te", "hop-by-hop", id="te"),
    pytest.param("header:upgrade", "hop-by-hop", id="upgrade"),
    pytest.param("header:content-length", "request body", id="content-length"),
    pytest.param("header:content-type", "request body", id="content-type"),
    pytest.param("header:host", "authority", id="host"),
    pytest.param("header:authorization", "credentials", id="authorization"),
    pytest.param("header:proxy-authorization", "credentials", id="proxy-authorization"),
    pytest.param("header:cookie", "forward_rules", id="cookie"),
    pytest.param("header:x-request-id", "Envoy sets it", id="request-id"),
    pytest.param("header:x-forwarded-for", "Envoy sets it", id="forwarded-for"),
    pytest.param("header:x-envoy-original-path", "x-envoy-", id="envoy-reserved"),
]


@pytest.mark.parametrize(("text", "expected"), ACCEPTED)
def test_accepted_source(text: str, expected: PrincipalSource) -> None:
    parsed = parse_principal_source(text)
    assert parsed == expected
    assert parse_principal_source(str(parsed)) == parsed


@pytest.mark.parametrize(("text", "reason"), REFUSED)
def test_refused_source_says_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_principal_source(text)


def test_a_header_name_goes_only_with_the_header_kind() -> None:
    with pytest.raises(ValueError, match="only with it"):
        PrincipalSource(PrincipalKind.HEADER)
    with pytest.raises(ValueError, match="only with it"):
        PrincipalSource(PrincipalKind.KEY_HASH, HeaderName("x-tenant"))


def _settings(source: str, database_url: str = "postgresql://unused@127.0.0.1:1/x") -> Settings:
    return Settings.from_env(
        {
            "EXTPROC_DATABASE_URL": database_url,
            "EXTPROC_PRINCIPAL_SOURCE": source,
            "EXTPROC_LISTEN": "127.0.0.1:0",
            "EXTPROC_METRICS_LISTEN": "off",
            "EXTPROC_SWEEP_INTERVAL_S": "0",
        }
    )


@pytest.mark.parametrize(("text", "expected"), ACCEPTED)
def test_config_validation_accepts_what_the_parser_accepts(
    text: str, expected: PrincipalSource
) -> None:
    assert _settings(text).principal_source == expected


# An empty variable means the default (api_keys) in the settings, so it is left out there.
@pytest.mark.parametrize(("text", "reason"), [p for p in REFUSED if p.values[0]])
def test_config_validation_refuses_what_the_parser_refuses(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        _settings(text)
    (problem,) = caught.value.problems
    assert problem.startswith(f"EXTPROC_PRINCIPAL_SOURCE={text.strip()!r}: ")


async def _answer_has_cache_fields(channel: grpc.aio.Channel, headers: dict[str, str]) -> bool:
    """One chat request through the server: does the answer get our cache fields?"""
    from extproc._envoy_api.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    stream = EnvoySide(pb_grpc.ExternalProcessorStub(channel).Process())
    await stream.request_headers(**bearer(), **headers)
    await stream.request_body(MARKED)
    await stream.response_headers(200, "application/json")
    reply = await stream.response_body(JSON_ANSWER, eos=True)
    await stream.finish()
    return b"cache_read_input_tokens" in common(reply).body_mutation.body


@pytest.mark.parametrize(("text", "expected"), ACCEPTED_HEADERS)
async def test_start_up_serves_and_reads_every_accepted_header(
    database_url: str, text: str, expected: PrincipalSource
) -> None:
    # A cache-enabled model and no tokenizer: a known principal gets the cache fields (all
    # zero), an unknown one none at all.
    enable(database_url, MODEL, 1)
    app = App(_settings(text, database_url))
    metrics, metrics_server = start_metrics(None, 0)
    try:
        await asyncio.wait_for(app.start(metrics), 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            assert await health_of(channel, "") == "SERVING"
            assert await _answer_has_cache_fields(channel, {str(expected.header): "tenant-a"})
            assert not await _answer_has_cache_fields(channel, {"x-someone-else": "tenant-a"})
    finally:
        await app.stop()
        metrics_server.close()
