"""``extproc serve``: run the ext_proc gRPC server with settings from the environment."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from extproc.config import ConfigError, Settings
from extproc.core import codec
from extproc.core.model import Tier
from extproc.principals import PrincipalKind, PrincipalSource
from extproc.restarts import EXIT_GAVE_UP
from extproc.stripping import StrippingError, principal_header_problems, read_stripping

EXIT_CONFIG = 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the ext_proc gRPC server (settings from EXTPROC_* variables)",
        description=f"Run the Envoy ext_proc server. Settings come from EXTPROC_* environment "
        "variables and an optional TOML file (--config or EXTPROC_CONFIG_FILE; the environment "
        "wins). Invalid settings are all listed and the command exits 2. SIGTERM or SIGINT "
        "stops it gracefully (exit 0). With several workers, one that exits is restarted; when "
        "they keep exiting, or one cannot start, the others are stopped and it exits "
        f"{EXIT_GAVE_UP}. With --envoy-config, a header principal source is compared with what "
        "that Envoy configuration removes from clients: a disagreement is a warning on stderr "
        "and never changes the exit code.",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the settings, print them (without secrets) and exit: 0 when they are "
        "valid (warnings, if any, on stderr), 2 when they or an --envoy-config file are not",
    )
    parser.add_argument(
        "--envoy-config",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an Envoy bootstrap, Kubernetes ConfigMap, Istio EnvoyFilter or Envoy Gateway "
        "ClientTrafficPolicy in front of this server: warn unless it removes every client copy "
        "of the principal header before ext_proc (repeatable)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(os.environ, args.config)
    except ConfigError as err:
        print(f"extproc serve: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        notes = envoy_notes(settings.principal_source, args.envoy_config, args.check)
    except StrippingError as err:
        print(f"extproc serve: --envoy-config {err}", file=sys.stderr)
        return EXIT_CONFIG
    for note in notes:
        print(f"extproc serve: {note}", file=sys.stderr)
    if args.check:
        from extproc.adapters import tracing

        try:
            traces = tracing.describe(os.environ)
        except tracing.TracingConfigError as err:
            print(f"extproc serve: {err}", file=sys.stderr)
            return EXIT_CONFIG
        sys.stdout.write(codec.pretty({**describe(settings), "traces": traces}).decode())
        return 0
    from extproc import app

    return app.main(settings)


def envoy_notes(source: PrincipalSource, configs: list[Path], checking: bool) -> list[str]:
    """Warnings where the Envoy configurations would let clients set the principal header."""
    if source.kind is not PrincipalKind.HEADER:
        return []
    if not configs:
        if not checking:
            return []
        return [
            f"note: not compared with an Envoy configuration (--envoy-config FILE): Envoy must "
            f"remove every client copy of {source.stripped_header} before the ext_proc filter"
        ]
    problems = [
        problem
        for path in configs
        for problem in principal_header_problems(source, read_stripping(path), str(path))
    ]
    return [f"warning: {problem}" for problem in problems]


def describe(settings: Settings) -> dict[str, object]:
    """The effective settings for people; the database URL is reduced to its host and name."""
    return {
        "listen": settings.listen,
        "database": redact_url(settings.database_url),
        "enabled_ttls": [t.value for t in Tier if t in settings.tiers.enabled],
        "default_ttl": settings.tiers.default.value,
        "principal_source": str(settings.principal_source),
        "tokenizer_url": settings.tokenizer_url,
        "tokenizers": dict(settings.tokenizers),
        "tokenizer_timeout_ms": settings.tokenizer_timeout_ms,
        "classify_deadline_ms": settings.classify_deadline_ms,
        "commit_deadline_ms": settings.commit_deadline_ms,
        "max_body_bytes": settings.max_body_bytes,
        "grpc_message_limit": settings.grpc_message_limit,
        "metrics_listen": str(settings.metrics_listen) if settings.metrics_listen else "off",
        "shutdown_grace_s": settings.shutdown_grace_s,
        "workers": settings.workers,
        "log_level": settings.log_level,
        "sweep_interval_s": settings.sweep_interval_s,
    }


def redact_url(url: str) -> str:
    """``postgresql://user:secret@host:5432/db`` → ``postgresql://host:5432/db``."""
    parts = urlsplit(url)
    if not parts.scheme:
        return "<libpq settings>"
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc, query=""))
