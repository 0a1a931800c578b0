"""Settings from the environment and an optional TOML file, validated once, all problems at once.

Every variable is ``EXTPROC_<NAME>``; the file (``EXTPROC_CONFIG_FILE`` or ``--config``) uses the
same names in lower case, with or without the ``extproc_`` prefix. The environment wins over the
file. ``Settings.from_env`` is pure: it reads only the mapping and the file it is given (and,
for ``EXTPROC_WORKERS=auto``, the process's CPU limits), and raises one ``ConfigError`` that
lists every problem.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from extproc.core import defaults
from extproc.core.classify import EngineCache
from extproc.core.defaults import reply_budget_ms, reply_margin_ms
from extproc.core.errors import ExtprocError
from extproc.core.model import DEFAULT_TELEMETRY_PREFIXES, RequestPolicy, Tier, TierPolicy
from extproc.cpus import usable_cpus
from extproc.principals import API_KEYS, PrincipalSource, parse_principal_source
from extproc.principals import PrincipalKind as PrincipalKind  # re-exported for callers
from extproc.tokenizer_map import parse_tokenizer_map

PREFIX = "EXTPROC_"
MIB = 1 << 20
# gRPC messages carry the body plus headers and framing; this is the headroom above the body.
GRPC_HEADROOM_BYTES = 1 * MIB
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_WORKERS = 256

_DEFAULTS: dict[str, str] = {
    "LISTEN": "127.0.0.1:50051",
    "DATABASE_URL": "",
    "ENABLED_TTLS": "5m,1h,24h",
    "DEFAULT_TTL": "5m",
    "PRINCIPAL_SOURCE": "api_keys",
    "TOKENIZER_URL": "",
    "TOKENIZERS": "",
    "TOKENIZER_TIMEOUT_MS": "1000",
    "CLASSIFY_DEADLINE_MS": str(defaults.CLASSIFY_DEADLINE_MS),
    "ENVOY_MESSAGE_TIMEOUT_MS": str(defaults.ENVOY_MESSAGE_TIMEOUT_MS),
    "ENVOY_MAX_MESSAGE_TIMEOUT_MS": str(defaults.ENVOY_MAX_MESSAGE_TIMEOUT_MS),
    "COMMIT_DEADLINE_MS": str(defaults.COMMIT_DEADLINE_MS),
    "MAX_BODY_BYTES": str(defaults.MAX_BODY_BYTES),
    "METRICS_LISTEN": "127.0.0.1:9464",
    "SHUTDOWN_GRACE_S": "20",
    "WORKERS": "1",
    "LOG_LEVEL": "INFO",
    "SWEEP_INTERVAL_S": "60",
    "TELEMETRY_PREFIXES": ",".join(DEFAULT_TELEMETRY_PREFIXES),
    "TELEMETRY_STRIP": "true",
    "SCRUB_PROVIDER_CACHE": "true",
    "ENGINE_CACHE": "off",
    "INDEX_MEMO_TTL_S": "2",
    "INDEX_MEMO_SIZE": "10000",
    "REFRESH_DEBOUNCE_PCT": "10",
    "STALE_FOR_S": "60",
    "BREAKER_FAILURES": "5",
    "BREAKER_COOLDOWN_S": "2",
    "TOKENIZER_QUEUE": "64",
}
KNOWN_KEYS = (*_DEFAULTS, "CONFIG_FILE")
# Never echoed in error messages: a database URL may carry a password.
_SECRET_KEYS = frozenset({"DATABASE_URL"})


class ConfigError(ExtprocError):
    """The configuration is invalid; ``problems`` lists every reason, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class HostPort:
    """A TCP listen address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server needs, already validated."""

    listen: str = "127.0.0.1:50051"
    database_url: str = ""
    tiers: TierPolicy = field(default_factory=TierPolicy)
    principal_source: PrincipalSource = API_KEYS
    tokenizer_url: str | None = None
    tokenizers: tuple[tuple[str, str], ...] = ()
    tokenizer_timeout_ms: int = 1000
    classify_deadline_ms: int = defaults.CLASSIFY_DEADLINE_MS
    envoy_message_timeout_ms: int = defaults.ENVOY_MESSAGE_TIMEOUT_MS
    envoy_max_message_timeout_ms: int = defaults.ENVOY_MAX_MESSAGE_TIMEOUT_MS
    commit_deadline_ms: int = defaults.COMMIT_DEADLINE_MS
    max_body_bytes: int = defaults.MAX_BODY_BYTES
    metrics_listen: HostPort | None = HostPort("127.0.0.1", 9464)
    shutdown_grace_s: float = 20.0
    workers: int = 1
    log_level: str = "INFO"
    sweep_interval_s: float = 60.0
    telemetry_prefixes: tuple[str, ...] = DEFAULT_TELEMETRY_PREFIXES
    telemetry_strip: bool = True
    scrub_provider_cache: bool = True
    engine_cache: EngineCache = EngineCache.IGNORE
    index_memo_ttl_s: float = 2.0
    index_memo_size: int = 10_000
    refresh_debounce_pct: int = 10
    stale_for_s: float = 60.0
    breaker_failures: int = 5
    breaker_cooldown_s: float = 2.0
    tokenizer_queue: int = 64

    @property
    def request_policy(self) -> RequestPolicy:
        """How request bodies are read: tiers and telemetry blocks."""
        return RequestPolicy(self.tiers, self.telemetry_prefixes, self.telemetry_strip)

    @property
    def grpc_message_limit(self) -> int:
        """gRPC max receive/send message length: the body limit plus headroom."""
        return self.max_body_bytes + GRPC_HEADROOM_BYTES

    @classmethod
    def from_env(cls, env: Mapping[str, str], file: Path | None = None) -> Settings:
        """Validate ``env`` (and ``file`` or ``EXTPROC_CONFIG_FILE``); raise ``ConfigError``."""
        problems: list[str] = []
        raw = _merge(env, file, problems)
        parsed = {key: _parse_one(key, raw[key], problems) for key in _PARSERS}
        if problems:
            raise ConfigError(problems)
        tiers = _tier_policy(parsed["ENABLED_TTLS"], parsed["DEFAULT_TTL"], problems)
        _check_workers(raw["WORKERS"], parsed["WORKERS"], parsed["LISTEN"], problems)
        _check_message_timeouts(parsed, problems)
        if problems or tiers is None:
            raise ConfigError(problems)
        return cls(
            listen=parsed["LISTEN"],
            database_url=parsed["DATABASE_URL"],
            tiers=tiers,
            principal_source=parsed["PRINCIPAL_SOURCE"],
            tokenizer_url=parsed["TOKENIZER_URL"],
            tokenizers=parsed["TOKENIZERS"],
            tokenizer_timeout_ms=parsed["TOKENIZER_TIMEOUT_MS"],
            classify_deadline_ms=parsed["CLASSIFY_DEADLINE_MS"],
            envoy_message_timeout_ms=parsed["ENVOY_MESSAGE_TIMEOUT_MS"],
            envoy_max_message_timeout_ms=parsed["ENVOY_MAX_MESSAGE_TIMEOUT_MS"],
            commit_deadline_ms=parsed["COMMIT_DEADLINE_MS"],
            max_body_bytes=parsed["MAX_BODY_BYTES"],
            metrics_listen=parsed["METRICS_LISTEN"],
            shutdown_grace_s=parsed["SHUTDOWN_GRACE_S"],
            workers=parsed["WORKERS"],
            log_level=parsed["LOG_LEVEL"],
            sweep_interval_s=parsed["SWEEP_INTERVAL_S"],
            telemetry_prefixes=parsed["TELEMETRY_PREFIXES"],
            telemetry_strip=parsed["TELEMETRY_STRIP"],
            scrub_provider_cache=parsed["SCRUB_PROVIDER_CACHE"],
            engine_cache=parsed["ENGINE_CACHE"],
            index_memo_ttl_s=parsed["INDEX_MEMO_TTL_S"],
            index_memo_size=parsed["INDEX_MEMO_SIZE"],
            refresh_debounce_pct=parsed["REFRESH_DEBOUNCE_PCT"],
            stale_for_s=parsed["STALE_FOR_S"],
            breaker_failures=parsed["BREAKER_FAILURES"],
            breaker_cooldown_s=parsed["BREAKER_COOLDOWN_S"],
            tokenizer_queue=parsed["TOKENIZER_QUEUE"],
        )


def _merge(env: Mapping[str, str], file: Path | None, problems: list[str]) -> dict[str, str]:
    """Defaults, then the file, then the environment (empty variables count as unset)."""
    merged = dict(_DEFAULTS)
    path = file or (Path(env[PREFIX + "CONFIG_FILE"]) if env.get(PREFIX + "CONFIG_FILE") else None)
    if path is not None:
        merged.update(_read_file(path, problems))
    for key in _DEFAULTS:
        value = env.get(PREFIX + key)
        if value is not None and value.strip():
            merged[key] = value.strip()
    return merged


def _read_file(path: Path, problems: list[str]) -> dict[str, str]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"config file {path}: cannot read: {exc.strerror or exc}")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"config file {path}: not valid TOML: {exc}")
        return {}
    out: dict[str, str] = {}
    for name, value in data.items():
        key = name.upper().removeprefix(PREFIX)
        if key not in _DEFAULTS:
            problems.append(f"config file {path}: unknown key {name!r}")
            continue
        out[key] = _file_value(value)
    return out


def _file_value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _parse_one(key: str, text: str, problems: list[str]) -> Any:
    try:
        return _PARSERS[key](text)
    except ValueError as exc:
        shown = "<redacted>" if key in _SECRET_KEYS else repr(text)
        problems.append(f"{PREFIX}{key}={shown}: {exc}")
        return None


def _listen(text: str) -> str:
    if text.startswith("unix:"):
        if not text.removeprefix("unix:").strip("/"):
            raise ValueError("unix socket path is empty")
        return text
    return str(_host_port(text))


_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\[\]\s]+)):(?P<port>\d+)")


def _host_port(text: str) -> HostPort:
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        raise ValueError("expected host:port (IPv6 as [addr]:port) or unix:/path")
    port = int(match["port"])
    if not 0 <= port <= 65535:
        raise ValueError("port must be in 0..65535")
    return HostPort(match["v6"] or match["host"], port)


def _metrics_listen(text: str) -> HostPort | None:
    return None if text.lower() == "off" else _host_port(text)


def _database_url(text: str) -> str:
    if not text:
        raise ValueError("required: the PostgreSQL URL of the prefix index")
    if not text.startswith(("postgresql://", "postgres://", "host=", "dbname=")):
        raise ValueError("expected a postgresql:// URL or a libpq key=value string")
    return text


def _tokenizer_url(text: str) -> str | None:
    if not text:
        return None
    try:
        url = urlsplit(text)
        url.port  # noqa: B018 (reading it checks it)
    except ValueError:
        raise ValueError("expected an http:// or https:// URL with a valid port") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    return text


def _tiers(text: str) -> frozenset[Tier]:
    tiers: set[Tier] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        tier = Tier.parse(item)
        if tier is None:
            raise ValueError(f"unknown tier {item!r} (known: {', '.join(t.value for t in Tier)})")
        tiers.add(tier)
    if not tiers:
        raise ValueError("at least one tier must be enabled")
    return frozenset(tiers)


def _tier(text: str) -> Tier:
    tier = Tier.parse(text)
    if tier is None:
        raise ValueError(f"unknown tier (known: {', '.join(t.value for t in Tier)})")
    return tier


def _tier_policy(enabled: frozenset[Tier], default: Tier, problems: list[str]) -> TierPolicy | None:
    if default not in enabled:
        listed = ", ".join(t.value for t in Tier if t in enabled)
        problems.append(
            f"{PREFIX}DEFAULT_TTL={default.value!r}: not among {PREFIX}ENABLED_TTLS ({listed})"
        )
        return None
    return TierPolicy(enabled=enabled, default=default)


def _workers(text: str) -> int:
    """A number of worker processes, or ``auto``: as many as the CPUs this process may use."""
    if text.lower() == "auto":
        return min(usable_cpus(), MAX_WORKERS)
    try:
        return _bounded_int(1, MAX_WORKERS)(text)
    except ValueError as exc:
        raise ValueError(f"{exc} (or auto)") from None


def _check_workers(text: str, workers: int, listen: str, problems: list[str]) -> None:
    """Several workers share one TCP port (SO_REUSEPORT): a fixed port, no Unix socket."""
    if workers > 1 and (listen.startswith("unix:") or listen.endswith(":0")):
        shown = f"{text} ({workers} CPUs)" if text.lower() == "auto" else text
        problems.append(
            f"{PREFIX}WORKERS={shown}: several workers need a fixed TCP port in {PREFIX}LISTEN"
        )


def _check_message_timeouts(parsed: Mapping[str, Any], problems: list[str]) -> None:
    """A classification may wait only as long as Envoy lets a reply be extended."""
    deadline = parsed["CLASSIFY_DEADLINE_MS"]
    timeout, ceiling = parsed["ENVOY_MESSAGE_TIMEOUT_MS"], parsed["ENVOY_MAX_MESSAGE_TIMEOUT_MS"]
    if deadline <= reply_budget_ms(timeout):
        return
    if deadline + reply_margin_ms(timeout) > ceiling:
        problems.append(
            f"{PREFIX}CLASSIFY_DEADLINE_MS={deadline}: longer than Envoy lets a reply wait "
            f"({PREFIX}ENVOY_MAX_MESSAGE_TIMEOUT_MS={ceiling}, less a margin of "
            f"{reply_margin_ms(timeout)} ms); raise max_message_timeout in Envoy and here, or "
            "shorten the deadline"
        )


def _tokenizer_files(text: str) -> tuple[tuple[str, str], ...]:
    """``alias=path`` pairs separated by commas, or a JSON object of alias to path."""
    return tuple(parse_tokenizer_map(text).items())


def parse_telemetry_prefixes(text: str) -> tuple[str, ...]:
    """Comma-separated telemetry prefixes; ``none`` for none."""
    if text.strip().lower() == "none":
        return ()
    prefixes = tuple(p.strip() for p in text.split(",") if p.strip())
    if not prefixes:
        raise ValueError("expected comma-separated prefixes, or none")
    return prefixes


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _flag(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError("expected true or false")


def _engine_cache(text: str) -> EngineCache:
    try:
        return EngineCache(text.lower())
    except ValueError:
        raise ValueError("expected off or report") from None


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise ValueError("expected an integer") from None
        if not low <= value <= high:
            raise ValueError(f"must be in {low}..{high}")
        return value

    return parse


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("expected a number of seconds") from None
        if not low <= value <= high:
            raise ValueError(f"must be in {low:g}..{high:g}")
        return value

    return parse


_SIZE = re.compile(r"(?P<n>\d+)\s*(?P<unit>|b|k|kb|kib|m|mb|mib|g|gb|gib)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _size(text: str) -> int:
    match = _SIZE.fullmatch(text.replace("_", ""))
    if match is None:
        raise ValueError("expected a byte count such as 8388608 or 8MiB")
    value = int(match["n"]) * _UNITS[match["unit"][:1].lower()]
    if not 1024 <= value <= 1 << 30:
        raise ValueError("must be between 1 KiB and 1 GiB")
    return value


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return text.upper()


_PARSERS: dict[str, Callable[[str], Any]] = {
    "LISTEN": _listen,
    "DATABASE_URL": _database_url,
    "ENABLED_TTLS": _tiers,
    "DEFAULT_TTL": _tier,
    "PRINCIPAL_SOURCE": parse_principal_source,
    "TOKENIZER_URL": _tokenizer_url,
    "TOKENIZERS": _tokenizer_files,
    "TOKENIZER_TIMEOUT_MS": _bounded_int(1, 60_000),
    "CLASSIFY_DEADLINE_MS": _bounded_int(1, 60_000),
    "ENVOY_MESSAGE_TIMEOUT_MS": _bounded_int(1, 3_600_000),
    "ENVOY_MAX_MESSAGE_TIMEOUT_MS": _bounded_int(0, 3_600_000),
    "COMMIT_DEADLINE_MS": _bounded_int(1, 600_000),
    "MAX_BODY_BYTES": _size,
    "METRICS_LISTEN": _metrics_listen,
    "SHUTDOWN_GRACE_S": _seconds(0, 3600),
    "WORKERS": _workers,
    "LOG_LEVEL": _log_level,
    "SWEEP_INTERVAL_S": _seconds(0, 86400),
    "TELEMETRY_PREFIXES": parse_telemetry_prefixes,
    "TELEMETRY_STRIP": _flag,
    "SCRUB_PROVIDER_CACHE": _flag,
    "ENGINE_CACHE": _engine_cache,
    "INDEX_MEMO_TTL_S": _seconds(0, 60),
    "INDEX_MEMO_SIZE": _bounded_int(1, 10_000_000),
    "REFRESH_DEBOUNCE_PCT": _bounded_int(0, 50),
    "STALE_FOR_S": _seconds(0, 86400),
    "BREAKER_FAILURES": _bounded_int(1, 1000),
    "BREAKER_COOLDOWN_S": _seconds(0, 600),
    "TOKENIZER_QUEUE": _bounded_int(0, 100_000),
}
