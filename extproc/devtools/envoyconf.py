"""Render the shipped Envoy bootstrap for other addresses, limits, failure modes and headers.

The packaged ``extproc/envoy/envoy.yaml`` is the one source: ``envoy/envoy.yaml`` at the top of
the repository is a byte-identical copy, ``envoy/envoy-fail-open.yaml`` is derived from it by
``fail_open_text`` (comments kept, one line changed), and ``render`` patches a parsed copy for
``extproc dev`` and the end-to-end tests.
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import yaml

from extproc.core import defaults
from extproc.core.route import header_attribute
from extproc.principals import DEFAULT_PRINCIPAL_HEADER, parse_header_name

MIB = 1 << 20
DEFAULT_MAX_BODY_BYTES = defaults.MAX_BODY_BYTES
DEFAULT_CLASSIFY_DEADLINE_MS = defaults.CLASSIFY_DEADLINE_MS
# The shipped file's message_timeout and max_message_timeout (EXTPROC_ENVOY_*_MS).
BASE_MESSAGE_TIMEOUT_MS = defaults.ENVOY_MESSAGE_TIMEOUT_MS
BASE_MAX_MESSAGE_TIMEOUT_MS = defaults.ENVOY_MAX_MESSAGE_TIMEOUT_MS
# Room beyond the classify deadline in an extended reply: the trip to Envoy and back.
MESSAGE_TIMEOUT_HEADROOM_MS = 1000
FAIL_CLOSED_LINE = "failure_mode_allow: false"
FAIL_OPEN_LINE = "failure_mode_allow: true"
FAIL_OPEN_BANNER = (
    "# GENERATED from envoy.yaml by `python -m extproc.devtools.envoyconf fail-open`: do not\n"
    "# edit.\n"
    "# The fail-open variant: identical to envoy.yaml except failure_mode_allow: true\n"
    "# (see the trade-off at that line).\n"
)
LISTENER = "llm_ingress"
UPSTREAM_CLUSTER = "llm"
EXTPROC_CLUSTER = "ext_proc"
EXTPROC_FILTER = defaults.ENVOY_FILTER_NAME
EARLY_HEADER_MUTATION = "envoy.http.early_header_mutation.header_mutation"
STDOUT_LOG = "envoy.access_loggers.stdout"
FILE_LOG = "envoy.access_loggers.file"
FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


class Layout(enum.Enum):
    """Which ext_proc messages Envoy sends; the server accepts all three."""

    BODY_FIRST = "body-first"  # request headers skipped (the shipped file): 3 messages for JSON
    HEADERS_FIRST = "headers-first"  # every phase: 4 messages for JSON
    STREAMED = "streamed"  # both headers skipped, answers streamed: 2 or more for JSON


class EnvoyConfError(ValueError):
    """An option cannot be expressed in the Envoy bootstrap."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """The LLM upstream as Envoy's ``llm`` cluster needs it."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Upstream:
        """``http(s)://host[:port]``; a path or query is refused (routes keep the client's)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EnvoyConfError(f"upstream {url!r}: expected http://host[:port] or https://...")
        if parts.path not in ("", "/") or parts.query:
            raise EnvoyConfError(f"upstream {url!r}: no path or query allowed")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls)

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class EnvoyOptions:
    """Everything ``render`` can change; the defaults reproduce the shipped file's values."""

    listen_host: str = "0.0.0.0"
    listen_port: int = 10000
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    upstream_url: str = "http://127.0.0.1:8000"
    # ``host:port``, ``[v6]:port`` or ``unix:/path`` (as EXTPROC_LISTEN spells it).
    extproc_address: str = "127.0.0.1:50051"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    classify_deadline_ms: int = DEFAULT_CLASSIFY_DEADLINE_MS
    fail_open: bool = False
    message_timeout_ms: int = BASE_MESSAGE_TIMEOUT_MS
    # The trusted header of EXTPROC_PRINCIPAL_SOURCE=header:<name>: every client copy is removed
    # before any HTTP filter runs, so only the authentication filter's value reaches ext_proc.
    principal_header: str = DEFAULT_PRINCIPAL_HEADER
    layout: Layout = Layout.BODY_FIRST
    # Where the JSON access log goes: Envoy's stdout (``None``, as shipped) or this file.
    access_log_path: str | None = None

    @property
    def max_message_timeout_ms(self) -> int:
        """Long enough for a reply that waits the whole classify deadline (it extends itself)."""
        needed = self.classify_deadline_ms + MESSAGE_TIMEOUT_HEADROOM_MS
        return max(BASE_MAX_MESSAGE_TIMEOUT_MS, self.message_timeout_ms, needed)

    def server_env(self) -> dict[str, str]:
        """The server settings that must agree with this bootstrap."""
        return {
            "EXTPROC_MAX_BODY_BYTES": str(self.max_body_bytes),
            "EXTPROC_CLASSIFY_DEADLINE_MS": str(self.classify_deadline_ms),
            "EXTPROC_ENVOY_MESSAGE_TIMEOUT_MS": str(self.message_timeout_ms),
            "EXTPROC_ENVOY_MAX_MESSAGE_TIMEOUT_MS": str(self.max_message_timeout_ms),
        }


def template_text() -> str:
    """The shipped bootstrap, comments included."""
    return resources.files("extproc").joinpath("envoy", "envoy.yaml").read_text(encoding="utf-8")


def fail_open_text(text: str) -> str:
    """The fail-open twin of ``text``: the banner plus exactly one changed line."""
    if text.count(FAIL_CLOSED_LINE) != 1:
        raise EnvoyConfError(f"expected exactly one {FAIL_CLOSED_LINE!r} in the bootstrap")
    return FAIL_OPEN_BANNER + text.replace(FAIL_CLOSED_LINE, FAIL_OPEN_LINE)


def render(options: EnvoyOptions) -> str:
    """The shipped bootstrap with ``options`` applied, as YAML text (comments dropped)."""
    config = yaml.safe_load(template_text())
    _patch_admin(config, options)
    _patch_listener(_named(config["static_resources"]["listeners"], LISTENER), options)
    clusters = config["static_resources"]["clusters"]
    upstream = _named(clusters, UPSTREAM_CLUSTER)
    upstream["per_connection_buffer_limit_bytes"] = options.max_body_bytes
    _patch_upstream(upstream, Upstream.parse(options.upstream_url))
    _patch_extproc_cluster(_named(clusters, EXTPROC_CLUSTER), options)
    if not Upstream.parse(options.upstream_url).is_ip:
        _rewrite_host(_routes(config))
    return yaml.dump(config, Dumper=_NoAliasDumper, sort_keys=False, width=120)


def _named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise EnvoyConfError(f"the bootstrap has no {name!r}")


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _patch_admin(config: dict[str, Any], options: EnvoyOptions) -> None:
    config["admin"]["address"] = _socket(options.admin_host, options.admin_port)


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = _hcm(_named(config["static_resources"]["listeners"], LISTENER))
    routes: list[dict[str, Any]] = []
    for host in hcm["route_config"]["virtual_hosts"]:
        routes.extend(host["routes"])
    return routes


def _patch_listener(listener: dict[str, Any], options: EnvoyOptions) -> None:
    listener["address"] = _socket(options.listen_host, options.listen_port)
    listener["per_connection_buffer_limit_bytes"] = options.max_body_bytes
    hcm = _hcm(listener)
    for host in hcm["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            if "request_body_buffer_limit" in route:
                route["request_body_buffer_limit"] = options.max_body_bytes
    _patch_principal_strip(hcm, options.principal_header)
    ext_proc = _named(hcm["http_filters"], EXTPROC_FILTER)["typed_config"]
    _patch_principal_attribute(ext_proc, options.principal_header)
    _patch_layout(hcm, ext_proc, options.layout)
    if options.access_log_path is not None:
        _patch_access_log(hcm, options.access_log_path)
    ext_proc["failure_mode_allow"] = options.fail_open
    ext_proc["message_timeout"] = _duration(options.message_timeout_ms)
    ext_proc["max_message_timeout"] = _duration(options.max_message_timeout_ms)


def _patch_access_log(hcm: dict[str, Any], path: str) -> None:
    """The same JSON access log, written to the file ``path`` instead of stdout."""
    for log in hcm["access_log"]:
        if log["name"] == STDOUT_LOG:
            log["name"] = FILE_LOG
            log_format = log["typed_config"]["log_format"]
            log["typed_config"] = {"@type": FILE_LOG_TYPE, "path": path, "log_format": log_format}


def _patch_principal_strip(hcm: dict[str, Any], header: str) -> None:
    """The early header mutation removes the client's copy of ``header`` (and nothing else)."""
    try:
        name = parse_header_name(header)
    except ValueError as exc:
        raise EnvoyConfError(f"principal header: {exc}") from None
    early = _named(hcm.get("early_header_mutation_extensions", []), EARLY_HEADER_MUTATION)
    early["typed_config"]["mutations"] = [{"remove": name}]


def _patch_principal_attribute(ext_proc: dict[str, Any], header: str) -> None:
    """Body first, the principal header reaches the server as a request attribute."""
    name = parse_header_name(header)
    shipped = header_attribute(DEFAULT_PRINCIPAL_HEADER)
    ext_proc["request_attributes"] = [
        header_attribute(name) if a == shipped else a for a in ext_proc["request_attributes"]
    ]


def _patch_layout(hcm: dict[str, Any], ext_proc: dict[str, Any], layout: Layout) -> None:
    """The processing mode of ``layout``, in the filter and in the breakpoint route."""
    modes = [ext_proc["processing_mode"]]
    if layout is Layout.HEADERS_FIRST:
        ext_proc["processing_mode"]["request_header_mode"] = "SEND"
    if layout is Layout.STREAMED:
        modes += [_route_mode(route) for route in _routes_of(hcm) if _route_mode(route)]
        for mode in modes:
            mode.update(response_header_mode="SKIP", response_body_mode="STREAMED")
        ext_proc["response_attributes"] = ["response.code"]


def _routes_of(hcm: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for host in hcm["route_config"]["virtual_hosts"] for r in host["routes"]]


def _route_mode(route: dict[str, Any]) -> dict[str, Any]:
    per_filter = route.get("typed_per_filter_config", {}).get(EXTPROC_FILTER, {})
    mode: dict[str, Any] = per_filter.get("overrides", {}).get("processing_mode", {})
    return mode


def _duration(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms / 1000:.3f}s"


def _patch_upstream(cluster: dict[str, Any], upstream: Upstream) -> None:
    cluster["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": {"address": _socket(upstream.host, upstream.port)}}]}
    ]
    if not upstream.is_ip:
        cluster["type"] = "LOGICAL_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if upstream.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": upstream.host,
            },
        }


def _rewrite_host(routes: list[dict[str, Any]]) -> None:
    """A named upstream expects its own name in ``Host``, not the client's."""
    for route in routes:
        route["route"]["auto_host_rewrite"] = True


def _patch_extproc_cluster(cluster: dict[str, Any], options: EnvoyOptions) -> None:
    cluster["per_connection_buffer_limit_bytes"] = 2 * options.max_body_bytes
    endpoint = {"address": _extproc_address(options.extproc_address)}
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [{"endpoint": endpoint}]}]


def _extproc_address(address: str) -> dict[str, Any]:
    if address.startswith("unix:"):
        path = "/" + address.removeprefix("unix:").lstrip("/")
        if path == "/":
            raise EnvoyConfError("extproc address: the unix socket path is empty")
        return {"pipe": {"path": path}}
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EnvoyConfError(f"extproc address {address!r}: expected host:port or unix:/path")
    return _socket(host.strip("[]"), int(port))


class _NoAliasDumper(yaml.SafeDumper):
    """Writes repeated objects out in full: no YAML anchors in the rendered file."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.devtools.envoyconf",
        description="Print the Envoy bootstrap: rendered with options, or its fail-open twin.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("fail-open", help="print envoy-fail-open.yaml (derived from envoy.yaml)")
    render_cmd = sub.add_parser("render", help="print the bootstrap with these options")
    defaults = EnvoyOptions()
    render_cmd.add_argument("--listen-host", default=defaults.listen_host)
    render_cmd.add_argument("--listen-port", type=int, default=defaults.listen_port)
    render_cmd.add_argument("--admin-port", type=int, default=defaults.admin_port)
    render_cmd.add_argument("--upstream", default=defaults.upstream_url)
    render_cmd.add_argument("--extproc", default=defaults.extproc_address)
    render_cmd.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    render_cmd.add_argument(
        "--classify-deadline-ms", type=int, default=defaults.classify_deadline_ms
    )
    render_cmd.add_argument("--message-timeout-ms", type=int, default=defaults.message_timeout_ms)
    render_cmd.add_argument("--fail-open", action="store_true")
    render_cmd.add_argument(
        "--access-log",
        metavar="PATH",
        default=None,
        help="write the JSON access log to this file instead of Envoy's stdout",
    )
    render_cmd.add_argument(
        "--principal-header",
        metavar="NAME",
        default=defaults.principal_header,
        help="the header of EXTPROC_PRINCIPAL_SOURCE=header:NAME, removed from every client "
        f"request before any HTTP filter (default {defaults.principal_header})",
    )
    render_cmd.add_argument(
        "--layout",
        choices=[layout.value for layout in Layout],
        default=defaults.layout.value,
        help="which ext_proc messages Envoy sends (default body-first: request headers "
        "skipped; headers-first: every phase; streamed: answers streamed without headers)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.action == "fail-open":
        sys.stdout.write(fail_open_text(template_text()))
        return 0
    options = EnvoyOptions(
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        admin_port=args.admin_port,
        upstream_url=args.upstream,
        extproc_address=args.extproc,
        max_body_bytes=args.max_body_bytes,
        classify_deadline_ms=args.classify_deadline_ms,
        fail_open=args.fail_open,
        message_timeout_ms=args.message_timeout_ms,
        principal_header=args.principal_header,
        layout=Layout(args.layout),
        access_log_path=args.access_log,
    )
    try:
        sys.stdout.write(render(options))
    except EnvoyConfError as exc:
        print(f"extproc.devtools.envoyconf: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
