"""``extproc explain``: show how a request body is split into blocks, markers and prefix hashes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from extproc.config import parse_telemetry_prefixes
from extproc.core import codec, dialects
from extproc.core.dialects import Dialect
from extproc.core.errors import ClientError, ExtprocError
from extproc.core.model import DEFAULT_TELEMETRY_PREFIXES, RequestPolicy, Tier, TierPolicy
from extproc.core.query import read_breakpoint_param
from extproc.core.request import Prepared, prepare_walked

EXIT_REJECTED = 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "explain",
        help="show blocks, breakpoints and prefix hashes of a request body",
        description="Read a request body (chat completions, Anthropic Messages or OpenAI "
        "Responses) and show what the sidecar sees: its route, blocks (tool definitions, "
        "system, message content, tool calls), cache breakpoints (the automatic one "
        "included), telemetry blocks left out, prefix hashes and whether the forwarded body "
        "changes. The route is --route, else the one --path names, else told by the body's "
        "shape. Invalid markers print the 400 body the client would get (in that route's "
        "envelope) and exit 2.",
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
        "--route",
        choices=[d.name for d in dialects.ALL],
        help="the API the body is for (default: from --path, else from the body's shape)",
    )
    parser.add_argument(
        "--path",
        help="the request path: its route, and on chat its cacheBreakpoint query parameter",
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
    dialect = _dialect(args.route, args.path, raw)
    try:
        automatic = dialect.breakpoint_param and read_breakpoint_param(args.path or "") is not None
        prepared = prepare_walked(raw, policy, automatic, dialect)
    except ClientError as err:
        sys.stdout.write(dialect.error_envelope(err).decode() + "\n")
        return EXIT_REJECTED
    if prepared is None:
        raise ExtprocError("input is not a JSON object; the sidecar would forward it untouched")
    sys.stdout.write(codec.pretty(describe(prepared)).decode())
    return 0


def _dialect(route: str | None, path: str | None, raw: bytes) -> Dialect:
    """The dialect ``--route`` names, else the one serving ``--path``, else the body's shape."""
    if route is not None:
        return dialects.by_name(route)
    if path is not None:
        found = dialects.for_request("POST", path)
        if found is None:
            raise ExtprocError(f"no route of the sidecar serves {path!r} (see --route)")
        return found
    try:
        doc = codec.loads(raw)
    except codec.JSONDecodeError:
        doc = None
    return dialects.by_name(detect_route(doc))


_ANTHROPIC_BLOCKS = frozenset(
    {"tool_use", "tool_result", "thinking", "redacted_thinking", "document"}
)


def detect_route(doc: Any) -> str:
    """The API a body is shaped for: ``responses``, ``messages`` or (the default) ``chat``."""
    if not isinstance(doc, dict):
        return "chat"
    if "messages" not in doc and ("input" in doc or "instructions" in doc):
        return "responses"
    if "system" in doc or any(_is_anthropic_tool(t) for t in _list(doc.get("tools"))):
        return "messages"
    for message in _list(doc.get("messages")):
        content = message.get("content") if isinstance(message, dict) else None
        if any(_is_anthropic_block(b) for b in _list(content)):
            return "messages"
    return "chat"


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _is_anthropic_tool(tool: Any) -> bool:
    return isinstance(tool, dict) and "input_schema" in tool


def _is_anthropic_block(block: Any) -> bool:
    if not isinstance(block, dict):
        return False
    kind = block.get("type")
    return kind in _ANTHROPIC_BLOCKS or (kind == "image" and "source" in block)


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
        "route": prepared.route,
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
