"""The real ``extproc serve`` with several workers: crashes are restarted, health follows the group.

Each test starts the server as the orchestrator would, then kills processes with SIGKILL and
watches what the parent does about it, through the health service, its log and the process
table. Waits are bounded polls that end as soon as the awaited state shows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from extproc.app import HEALTH_SERVICES
from extproc.commands.health import probe
from extproc.core import codec
from extproc.restarts import EXIT_GAVE_UP, RestartPolicy
from tests.fakes.tcp_proxy import TcpProxy
from tests.plugins.tokenizer import TOKENIZER_ALIAS

T = TypeVar("T")
BOUND_S = 90.0  # generous: the machine may be busy; every wait ends as soon as it can


@dataclass
class Server:
    """One ``extproc serve`` process, its address and its JSON log."""

    process: subprocess.Popen[bytes]
    address: str
    log: Path
    seen: list[psutil.Process] = field(default_factory=list)

    def entries(self, message: str) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        entries = [codec.loads(line) for line in lines if line.startswith("{")]
        return [entry for entry in entries if entry.get("msg") == message]

    def workers(self) -> list[psutil.Process]:
        """The live worker processes (not the multiprocessing resource tracker)."""
        found = []
        for child in psutil.Process(self.process.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and _is_worker(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        self.seen.extend(p for p in found if p not in self.seen)
        return found

    def health(self, service: str = "") -> str:
        return probe(self.address, service, timeout=1.0)

    def listens(self, worker: psutil.Process) -> bool:
        """Whether ``worker`` has bound the server's port (it is past its imports)."""
        port = int(self.address.rpartition(":")[2])
        sockets = worker.net_connections(kind="tcp")
        return any(s.status == psutil.CONN_LISTEN and s.laddr.port == port for s in sockets)

    def reports(self, status: str) -> bool:
        """Whether the overall and the ext_proc service health both read ``status``."""
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"the server exited with {self.process.returncode}:\n{tail}")
        return all(self.health(name) == status for name in HEALTH_SERVICES)


def _is_worker(cmdline: list[str]) -> bool:
    return "--multiprocessing-fork" in cmdline and any("spawn_main" in a for a in cmdline)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Starts ``extproc serve`` with two workers; kills whatever is left at the end."""
    servers: list[Server] = []

    def start(database_url: str, **extra: str) -> Server:
        address = f"127.0.0.1:{_free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
        env |= {
            "EXTPROC_LISTEN": address,
            "EXTPROC_DATABASE_URL": database_url,
            "EXTPROC_METRICS_LISTEN": "off",
            "EXTPROC_WORKERS": "2",
            "EXTPROC_SHUTDOWN_GRACE_S": "5",
            "EXTPROC_SWEEP_INTERVAL_S": "0",
            **{f"EXTPROC_{k.upper()}": v for k, v in extra.items()},
        }
        log = tmp_path / f"serve-{len(servers)}.log"
        with log.open("wb") as out:
            argv = [sys.executable, "-m", "extproc.cli", "serve"]
            process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        servers.append(Server(process, address, log))
        return servers[-1]

    yield start
    for server in servers:
        server.process.kill()
        server.process.wait()
        for proc in server.seen:
            if proc.is_running():
                proc.kill()


async def until(read: Callable[[], T], what: str) -> T:
    """``read()`` as soon as it is truthy; fails after ``BOUND_S`` (a bound, not a measurement)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    while not (value := await asyncio.to_thread(read)):
        if loop.time() > deadline:
            raise AssertionError(f"still waiting for {what}")
        await asyncio.sleep(0.05)
    return value


async def wait_exit(server: Server) -> int:
    """The parent's exit code, once it has exited."""
    await until(lambda: server.process.poll() is not None, "the parent to exit")
    code = server.process.returncode
    assert isinstance(code, int)
    return code


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running (an exited one nobody reaped yet does not count)."""
    alive = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def leftovers(server: Server) -> list[psutil.Process]:
    """Every worker the parent logged starting, or the test saw, that is still running."""
    logged = {entry["pid"] for entry in server.entries("worker started")}
    assert logged or server.seen, "no worker was ever seen"
    found = list(server.seen)
    for pid in logged - {proc.pid for proc in server.seen}:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return running(found)


async def serving_with(server: Server, count: int) -> list[psutil.Process]:
    """The workers, once the server reports SERVING with ``count`` of them."""

    def workers() -> list[psutil.Process]:
        found = server.workers()
        return found if len(found) == count else []

    await until(lambda: len(server.entries("serving")) == count, f"{count} workers serving")
    await until(lambda: server.reports("SERVING"), "SERVING")
    return await until(workers, f"{count} workers")


def through(proxy: TcpProxy, database_url: str) -> str:
    """``database_url`` reached through ``proxy``, as a libpq string the settings accept."""
    params = {k: v for k, v in conninfo_to_dict(database_url).items() if k not in ("host", "port")}
    return make_conninfo("host=127.0.0.1", port=proxy.port, **params)


async def test_a_killed_worker_is_restarted_and_health_says_not_serving_meanwhile(
    launch: Callable[..., Server], database_url: str, pg_proxy: TcpProxy
) -> None:
    server = launch(through(pg_proxy, database_url))
    victim, survivor = await serving_with(server, 2)
    await pg_proxy.stop()  # the replacement cannot open its pool: the group stays below strength

    victim.kill()
    await until(lambda: server.reports("NOT_SERVING"), "NOT_SERVING")
    [replacement] = await until(
        lambda: [w for w in server.workers() if w.pid not in (victim.pid, survivor.pid)],
        "a replacement worker",
    )
    assert server.health() == "NOT_SERVING"  # the replacement is still waiting for the database

    await pg_proxy.start()
    await until(lambda: server.reports("SERVING"), "SERVING again")
    [exited] = server.entries("worker exited")
    assert (exited["pid"], exited["exitcode"]) == (victim.pid, -signal.SIGKILL)
    assert exited["restart_in_s"] > 0
    assert sorted(w.pid for w in server.workers()) == sorted((survivor.pid, replacement.pid))

    server.process.send_signal(signal.SIGTERM)
    assert await wait_exit(server) == 0
    assert leftovers(server) == []
    assert sorted(e["exitcode"] for e in server.entries("worker stopped")) == [0, 0]


async def test_sigint_while_a_replacement_starts_drains_every_worker_and_exits_0(
    launch: Callable[..., Server], database_url: str, pg_proxy: TcpProxy
) -> None:
    server = launch(through(pg_proxy, database_url))
    victim, survivor = await serving_with(server, 2)
    await pg_proxy.stop()  # the replacement will be held in its start, waiting for the database
    victim.kill()
    [replacement] = await until(
        lambda: [w for w in server.workers() if w.pid not in (victim.pid, survivor.pid)],
        "a replacement worker",
    )
    # Listening, it handles SIGTERM; before that (still importing) SIGTERM's default would end it.
    await until(lambda: server.listens(replacement), "the replacement to listen")

    server.process.send_signal(signal.SIGINT)
    assert await wait_exit(server) == 0
    assert leftovers(server) == []
    assert sorted(e["exitcode"] for e in server.entries("worker stopped")) == [0, 0]
    assert server.entries("giving up on the workers") == []


async def test_a_worker_that_keeps_crashing_makes_the_parent_give_up(
    launch: Callable[..., Server], database_url: str, tokenizer_file: Path, tmp_path: Path
) -> None:
    tokenizer = tmp_path / "tokenizer.json"
    shutil.copyfile(tokenizer_file, tokenizer)
    server = launch(database_url, tokenizers=f"{TOKENIZER_ALIAS}={tokenizer}")
    victim, survivor = await serving_with(server, 2)
    tokenizer.write_text("not a tokenizer")  # every replacement now fails to start

    victim.kill()
    assert await wait_exit(server) == EXIT_GAVE_UP
    assert leftovers(server) == []
    [gave_up] = server.entries("giving up on the workers")
    assert gave_up["exit_code"] == EXIT_GAVE_UP
    exits = server.entries("worker exited")
    assert len(exits) == RestartPolicy().max_crashes
    assert len(server.entries("worker started")) == 2 + len(exits) - 1  # no start after the last
    [stopped] = server.entries("worker stopped")
    assert (stopped["pid"], stopped["exitcode"]) == (survivor.pid, 0)  # drained, not killed


async def test_a_worker_that_cannot_start_is_not_retried(
    launch: Callable[..., Server], database_url: str, tmp_path: Path
) -> None:
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("not a tokenizer")
    server = launch(database_url, tokenizers=f"{TOKENIZER_ALIAS}={tokenizer}")

    assert await wait_exit(server) == EXIT_GAVE_UP
    assert leftovers(server) == []
    assert len(server.entries("worker started")) == 2
    [gave_up] = server.entries("giving up on the workers")
    assert "before" in gave_up["reason"]
    failed = server.entries("worker failed")
    assert failed
    assert "tokenizer" in failed[0]["error"]


async def test_workers_stop_when_the_parent_is_killed(
    launch: Callable[..., Server], database_url: str
) -> None:
    server = launch(database_url)
    workers = await serving_with(server, 2)

    server.process.kill()
    server.process.wait()
    await until(lambda: not running(workers), "the workers to stop")
    assert server.health() == "UNREACHABLE"
