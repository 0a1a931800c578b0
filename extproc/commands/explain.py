"""``extproc explain``: show how a request body is split into blocks, markers and prefix hashes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from extproc.config import parse_telemetry_prefixes
from extproc.core import codec
from extproc.core.errors import ClientError, ExtprocError
from extproc.core.markers import error_envelope
from extproc.core.model import DEFAULT_TELEMETRY_PREFIXES, RequestPolicy, Tier, TierPolicy
from extproc.core.query import read_breakpoint_param
from extproc.core.request import Prepared, prepare_walked

EXIT_REJECTED = 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "explain",
        help="show blocks, breakpoints and prefix hashes of a request body",
        description="Read a chat-completions request body and show what the sidecar sees: "
        "blocks (tool definitions, message content, tool calls), cache breakpoints (the "
        "automatic one included), telemetry blocks left out, prefix hashes and whether the "
        "forwarded body changes. Invalid markers print the 400 body the client would get and "
        "exit 2.",
    )
    parser.add_argument("file", nargs="?", default="-", help="request body file, - for stdin")
    parser.add_argument(
        "--enabled-ttls",
        type=_tiers,
        default=frozenset(Tier),
        help="comma-separated enabled tiers (default: 5m,1h,24h)",
    )
    parser.add_argument(
        "--default-ttl",
        type=_tier,
        default=Tier.M5,
        help="tier of a marker without ttl (default: 5m)",
    )
    parser.add_argument(
        "--path",
        default="/v1/chat/completions",
        help="the request path, for its cacheBreakpoint query parameter",
    )
    parser.add_argument(
        "--telemetry-prefixes",
        type=parse_telemetry_prefixes,
        default=",".join(DEFAULT_TELEMETRY_PREFIXES),
        help="comma-separated prefixes of system telemetry blocks (none for none)",
    )
    parser.set_defaults(func=run)


def _tier(text: str) -> Tier:
    tier = Tier.parse(text.strip())
    if tier is None:
        known = ", ".join(t.value for t in Tier)
        raise argparse.ArgumentTypeError(f"unknown tier {text!r} (known: {known})")
    return tier


def _tiers(text: str) -> frozenset[Tier]:
    return frozenset(_tier(part) for part in text.split(",") if part.strip())


def run(args: argparse.Namespace) -> int:
    policy = RequestPolicy(_policy(args.enabled_ttls, args.default_ttl), args.telemetry_prefixes)
    raw = _read(args.file)
    try:
        automatic = read_breakpoint_param(args.path) is not None
        prepared = prepare_walked(raw, policy, automatic)
    except ClientError as err:
        sys.stdout.write(error_envelope(err).decode() + "\n")
        return EXIT_REJECTED
    if prepared is None:
        raise ExtprocError("input is not a JSON object; the sidecar would forward it untouched")
    sys.stdout.write(codec.pretty(describe(prepared)).decode())
    return 0


def _policy(enabled: frozenset[Tier], default: Tier) -> TierPolicy:
    try:
        return TierPolicy(enabled=enabled, default=default)
    except ValueError as exc:
        raise ExtprocError(str(exc)) from None


def _read(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise ExtprocError(f"cannot read {name}: {exc.strerror}") from None


def describe(prepared: Prepared) -> dict[str, Any]:
    """The JSON-ready view of a prepared request."""
    return {
        "model": prepared.model,
        "stream": prepared.stream,
        "blocks": [
            {
                "index": i,
                "where": b.where,
                "role": b.role,
                "kind": b.kind,
                "text_length": len(b.text),
            }
            for i, b in enumerate(prepared.blocks)
        ],
        "breakpoints": [
            {"block": p.block, "ttl": p.tier.value, "automatic": p.automatic}
            for p in prepared.breakpoints
        ],
        "telemetry_blocks": [
            {"where": t.where, "text_length": t.text_length} for t in prepared.telemetry
        ],
        "prefix_hashes": [h.hex() for h in prepared.hashes],
        "forwarded_body_changed": prepared.changed,
    }
