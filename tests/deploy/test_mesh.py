"""Istio's EnvoyFilter and Envoy Gateway's EnvoyExtensionPolicy agree with the shipped bootstrap."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.config import Settings
from extproc.core.defaults import reply_budget_ms
from extproc.core.dialects import ALL, for_request
from extproc.devtools.devstack import free_port
from extproc.devtools.envoyconf import EnvoyOptions, Layout, render
from extproc.devtools.upstream import UpstreamSettings, bound_port, start_upstream
from extproc.principals import DEFAULT_PRINCIPAL_HEADER
from extproc.stripping import stripping_of
from tests.deploy.manifests import (
    EXT_PROC,
    GATEWAY,
    ISTIO,
    ROOT,
    as_istio_sidecar,
    endpoint,
    envoy_binary,
    envoy_validate,
    ext_proc_filter,
    gateway_documents,
    istio_patches,
    load_all,
    named,
)


@pytest.fixture(scope="module")
def patches() -> dict[str, dict[str, Any]]:
    (envoy_filter,) = load_all(ISTIO)
    assert envoy_filter["apiVersion"] == "networking.istio.io/v1alpha3"
    assert envoy_filter["kind"] == "EnvoyFilter"
    return istio_patches()


@pytest.fixture(scope="module")
def bootstrap() -> dict[str, Any]:
    """The shipped bootstrap in the layout the mesh files use: every phase sent."""
    config: dict[str, Any] = yaml.safe_load(render(EnvoyOptions(layout=Layout.HEADERS_FIRST)))
    return config


def test_filter_goes_before_the_router_of_the_inbound_chain(
    patches: dict[str, dict[str, Any]],
) -> None:
    patch = patches["HTTP_FILTER"]
    assert patch["match"]["context"] == "SIDECAR_INBOUND"
    chain = patch["match"]["listener"]["filterChain"]["filter"]
    assert chain["name"] == "envoy.filters.network.http_connection_manager"
    assert chain["subFilter"]["name"] == "envoy.filters.http.router"
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    assert patch["patch"]["value"]["name"] == EXT_PROC


def _istio_ext_proc(patches: dict[str, dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = patches["HTTP_FILTER"]["patch"]["value"]["typed_config"]
    return config["extension_config"]["typed_config"]  # type: ignore[no-any-return]


def test_filter_settings_are_the_bootstraps(
    patches: dict[str, dict[str, Any]], bootstrap: dict[str, Any]
) -> None:
    ours = copy.deepcopy(_istio_ext_proc(patches))
    theirs = copy.deepcopy(ext_proc_filter(bootstrap))
    cluster = ours.pop("grpc_service")["envoy_grpc"]["cluster_name"]
    theirs.pop("grpc_service")
    assert ours == theirs
    assert cluster == patches["CLUSTER"]["patch"]["value"]["name"]


def test_cluster_is_the_bootstraps_on_localhost(
    patches: dict[str, dict[str, Any]], bootstrap: dict[str, Any]
) -> None:
    ours = copy.deepcopy(patches["CLUSTER"]["patch"]["value"])
    theirs = copy.deepcopy(named(bootstrap["static_resources"]["clusters"], "ext_proc"))
    assert endpoint(ours) == endpoint(theirs)
    for cluster in (ours, theirs):
        del cluster["name"], cluster["load_assignment"]
    assert ours == theirs
    assert patches["CLUSTER"]["patch"]["operation"] == "ADD"


def test_inbound_buffer_limit_is_the_body_limit(
    patches: dict[str, dict[str, Any]], bootstrap: dict[str, Any]
) -> None:
    listener = bootstrap["static_resources"]["listeners"][0]
    value = patches["LISTENER"]["patch"]["value"]
    assert (
        value["per_connection_buffer_limit_bytes"] == listener["per_connection_buffer_limit_bytes"]
    )


def test_principal_header_is_removed_where_ext_proc_runs(
    patches: dict[str, dict[str, Any]],
) -> None:
    strip, ext_proc = patches["NETWORK_FILTER"], patches["HTTP_FILTER"]
    assert strip["match"]["context"] == ext_proc["match"]["context"] == "SIDECAR_INBOUND"
    port = ext_proc["match"]["listener"]["portNumber"]
    assert strip["match"]["listener"]["portNumber"] == port
    chain = strip["match"]["listener"]["filterChain"]["filter"]
    assert chain == {"name": "envoy.filters.network.http_connection_manager"}
    assert strip["patch"]["operation"] == "MERGE"
    assert stripping_of(load_all(ISTIO)).removed == {DEFAULT_PRINCIPAL_HEADER}


def _patched_bootstrap(options: EnvoyOptions) -> dict[str, Any]:
    """The rendered bootstrap as the EnvoyFilter makes a sidecar's inbound listener."""
    config: dict[str, Any] = yaml.safe_load(render(options))
    as_istio_sidecar(config)
    return config


def test_patches_make_a_valid_envoy_config(tmp_path: Path) -> None:
    config = _patched_bootstrap(EnvoyOptions())
    assert stripping_of([config]).removed == {DEFAULT_PRINCIPAL_HEADER}
    assert envoy_validate(yaml.safe_dump(config, sort_keys=False), tmp_path) == ""


@pytest.fixture
async def upstream_url() -> AsyncIterator[str]:
    runner = await start_upstream(UpstreamSettings(), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
    finally:
        await runner.cleanup()


async def _wait_ready(admin: str, process: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient() as client:
        while process.returncode is None:
            try:
                if (await client.get(f"{admin}/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    pytest.fail("envoy exited before it was ready")


@pytest.mark.parametrize(
    ("method", "path", "reaches_ext_proc"),
    [
        pytest.param("POST", "/v1/chat/completions", True, id="chat"),
        pytest.param("POST", "/openai/v1/chat/completions?x=1", True, id="prefixed-with-query"),
        pytest.param("GET", "/v1/models", False, id="models"),
        pytest.param("GET", "/v1/chat/completions", False, id="chat-get"),
        pytest.param("POST", "/v1/chat/completions/more", False, id="longer-path"),
        pytest.param("POST", "/v1/messages", True, id="messages"),
        pytest.param("POST", "/anthropic/v1/responses?stream=1", True, id="prefixed-responses"),
        pytest.param("POST", "/v1/messages/count_tokens", False, id="count-tokens"),
        pytest.param("POST", "/v1/responses/resp_1/cancel", False, id="responses-cancel"),
    ],
)
async def test_matcher_sends_only_llm_apis_to_ext_proc(
    upstream_url: str,
    tmp_path: Path,
    method: str,
    path: str,
    reaches_ext_proc: bool,
) -> None:
    # ext_proc points at a closed port and fails closed: a 503 proves the filter ran.
    port, admin = free_port(), free_port()
    options = EnvoyOptions(
        listen_host="127.0.0.1",
        listen_port=port,
        admin_port=admin,
        upstream_url=upstream_url,
        extproc_address=f"127.0.0.1:{free_port()}",
    )
    config = tmp_path / "envoy.yaml"
    bootstrap = _patched_bootstrap(options)
    config.write_text(yaml.safe_dump(bootstrap))
    argv = [str(config), "--disable-hot-restart", "--log-level", "error"]
    process = await asyncio.create_subprocess_exec(
        envoy_binary(), "-c", *argv, stdout=asyncio.subprocess.DEVNULL
    )
    try:
        await _wait_ready(f"http://127.0.0.1:{admin}", process)
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient() as client:
            answer = await client.request(method, f"http://127.0.0.1:{port}{path}", json=body)
    finally:
        process.terminate()
        await process.wait()
    assert (answer.status_code == 503) is reaches_ext_proc
    reached_upstream = "x-envoy-upstream-service-time" in answer.headers
    assert reached_upstream is not reaches_ext_proc


@pytest.fixture(scope="module")
def gateway() -> dict[str, dict[str, Any]]:
    return gateway_documents()


def test_gateway_removes_the_principal_header_before_every_filter(
    gateway: dict[str, dict[str, Any]],
) -> None:
    policy = gateway["ClientTrafficPolicy"]
    assert policy["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    (target,) = policy["spec"]["targetRefs"]
    (parent,) = gateway["HTTPRoute"]["spec"]["parentRefs"]
    assert (target["kind"], target["name"]) == ("Gateway", parent["name"])
    assert stripping_of(load_all(GATEWAY)).removed == {DEFAULT_PRINCIPAL_HEADER}


def test_policy_attaches_to_the_llm_routes(gateway: dict[str, dict[str, Any]]) -> None:
    policy = gateway["EnvoyExtensionPolicy"]
    assert policy["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    (target,) = policy["spec"]["targetRefs"]
    route = gateway["HTTPRoute"]
    assert (target["kind"], target["name"]) == ("HTTPRoute", route["metadata"]["name"])
    (rule,) = route["spec"]["rules"]
    assert {m["method"] for m in rule["matches"]} == {"POST"}
    paths = [m["path"] for m in rule["matches"]]
    assert {p["type"] for p in paths} == {"Exact"}
    served = [for_request("POST", p["value"]) for p in paths]
    assert sorted(d.name for d in served if d is not None) == sorted(d.name for d in ALL)


def test_policy_processing_matches_the_server(
    gateway: dict[str, dict[str, Any]], bootstrap: dict[str, Any]
) -> None:
    (ext_proc,) = gateway["EnvoyExtensionPolicy"]["spec"]["extProc"]
    reference = ext_proc_filter(bootstrap)
    mode = ext_proc["processingMode"]
    assert reference["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert mode["request"] == {"body": "Buffered"}
    assert reference["processing_mode"]["response_header_mode"] == "SEND"
    assert mode["response"] == {}, "response headers sent, body mode left to the server"
    assert mode["allowModeOverride"] is reference["allow_mode_override"] is True
    assert ext_proc["failOpen"] is reference["failure_mode_allow"] is False


def test_policy_timeout_holds_the_whole_classify_deadline(
    gateway: dict[str, dict[str, Any]],
) -> None:
    """The policy cannot allow timer extensions: the server must know, and still fit."""
    (ext_proc,) = gateway["EnvoyExtensionPolicy"]["spec"]["extProc"]
    (container,) = gateway["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["EXTPROC_ENVOY_MAX_MESSAGE_TIMEOUT_MS"] == "0"
    timeout_ms = int(float(ext_proc["messageTimeout"].removesuffix("s")) * 1000)
    assert env["EXTPROC_ENVOY_MESSAGE_TIMEOUT_MS"] == str(timeout_ms)
    shared = load_all(ROOT / "deploy" / "kubernetes" / "settings-configmap.yaml")[0]["data"]
    settings = Settings.from_env({**shared, **env, "EXTPROC_DATABASE_URL": "postgresql://x@db/x"})
    assert settings.classify_deadline_ms <= reply_budget_ms(settings.envoy_message_timeout_ms)


def test_policy_backend_is_the_extproc_service(gateway: dict[str, dict[str, Any]]) -> None:
    (ext_proc,) = gateway["EnvoyExtensionPolicy"]["spec"]["extProc"]
    (backend,) = ext_proc["backendRefs"]
    service = gateway["Service"]
    assert (backend["kind"], backend["name"]) == ("Service", service["metadata"]["name"])
    (port,) = service["spec"]["ports"]
    assert backend["port"] == port["port"]
    assert port["appProtocol"] == "kubernetes.io/h2c"
    pod = gateway["Deployment"]["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named_ports[port["targetPort"]] == container["readinessProbe"]["grpc"]["port"]
