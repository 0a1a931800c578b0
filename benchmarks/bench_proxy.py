"""Measure extproc's cost side by side with its baselines, in one invocation, on loopback.

Paths, all against the same fast upstream (``fast_upstream.py``, its own process):

1. ``upstream``   the upstream directly, no Envoy;
2. ``envoy``      Envoy alone: the shipped bootstrap rendered without the ext_proc filter;
3. ``noop``       Envoy + ``noop_extproc.py``, a grpc.aio server that only answers CONTINUE
                  to every phase (4 messages for a JSON answer);
   ``floor``      the same do-nothing server in extproc's layout (``--layout``; 3 messages for
                  a JSON answer whose body is watched): what the messages extproc exchanges
                  cost with no work at all, the transport's floor under every extproc path;
4. ``write``      Envoy + ``extproc serve`` (embedded PostgreSQL, a real embedded tokenizer),
                  marked requests whose cached prefix is new every time (cache writes);
   ``read``       the same with one repeated marked prefix (cache reads);
5. ``inactive``   the same server, unmarked requests of a disabled model;
6. ``slow``       (``--stream`` only) cache writes whose tokenizer service answers
                  ``--slow-classify-s`` late: the stream's first bytes must not wait for it.

The extproc paths use the shipped Envoy layout (``--layout``); the do-nothing server always
gets every phase, as the reference point does. The run ends with the targets, each measured
against the do-nothing server of the same run.

For each path a separate load generator process (``loadgen.py``) warms up, then measures
latency at the first ``--connections`` value and throughput at the last; CPU per request of
Envoy, the sidecar, PostgreSQL, the upstream and the load generator comes from utime+stime in
``/proc/<pid>/stat`` (through psutil, whole process trees) before and after the measured part.
Every child runs in its own process group with a parent-death signal and is stopped at the
end, also on Ctrl-C. Usage: ``.venv/bin/python benchmarks/bench_proxy.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import http.client
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import psutil  # type: ignore[import-untyped]
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from extproc.core import codec  # noqa: E402
from extproc.devtools import devstack  # noqa: E402
from extproc.devtools.envoyconf import EXTPROC_FILTER, EnvoyOptions, Layout, render  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = "bench"
DISABLED_MODEL = "bench-off"
SLOW_MODEL = "bench-slow"
MIN_PREFIX_TOKENS = 1024
NONCE_MARKER = "NONCE-NONCE-NONCE-NONCE-"
PATH = "/v1/chat/completions"
READY_TIMEOUT_S = 90.0
PROFILE_WAIT_S = 60.0
PATHS = ("upstream", "envoy", "noop", "floor", "write", "read", "inactive", "slow")
WORDS = (
    "cache",
    "prefix",
    "token",
    "model",
    "answer",
    "request",
    "stream",
    "usage",
    "tenant",
    "index",
    "envoy",
    "proxy",
    "latency",
    "budget",
    "server",
    "client",
    "process",
    "message",
    "header",
    "body",
    "chunk",
    "frame",
    "event",
    "commit",
    "tier",
    "write",
    "read",
    "hash",
    "block",
    "system",
    "user",
    "assistant",
    "content",
    "policy",
    "deadline",
    "bound",
    "worker",
)
_PR_SET_PDEATHSIG = 1


# ---- children ----


def _die_with_parent() -> None:
    """In the child: SIGTERM when the benchmark dies, even by SIGKILL."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Children:
    """Child processes, each in its own process group; stopped newest first."""

    logs: Path
    running: list[tuple[str, subprocess.Popen[bytes], int]] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
        pipes: bool = False,
    ) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                list(argv),
                env=env,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log,
                stderr=log,
                user=user,
                process_group=0,
                preexec_fn=_die_with_parent,
            )
        self.running.append((name, process, stop_signal))
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        for entry in list(self.running):
            if entry[1] is process:
                self.running.remove(entry)
                _stop(entry[1], entry[2])

    def stop_all(self) -> None:
        while self.running:
            _name, process, sig = self.running.pop()
            _stop(process, sig)

    def tail(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _stop(process: subprocess.Popen[bytes], sig: int) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()


def wait_for(check: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if check():
                return
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {READY_TIMEOUT_S:g}s")
        time.sleep(0.05)


def accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def python_argv(script: str, *args: str) -> list[str]:
    return [sys.executable, str(HERE / script), *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


# ---- request bodies ----


def prose(size: int, seed: int) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size]


def chat_body(size: int, *, model: str, marked: bool, nonce: bool, stream: bool) -> bytes:
    """A chat request of about ``size`` bytes: a long system block, then a short question."""
    block: dict[str, Any] = {"type": "text", "text": ""}
    if marked:
        block["cache_control"] = {"type": "ephemeral", "ttl": "5m"}
    request: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": [block]},
            {"role": "user", "content": "Summarise the policy above in one sentence."},
        ],
        "max_tokens": 64,
    }
    if stream:
        request["stream"] = True
    room = size - len(codec.dumps(request))
    head = NONCE_MARKER + " " if nonce else ""
    block["text"] = head + prose(max(0, room - len(head)), seed=size)
    return codec.dumps(request)


# ---- measurement ----


def cpu_seconds(pid: int | None) -> float:
    """utime+stime of ``pid`` and all its descendants (0 when there is none)."""
    if pid is None:
        return 0.0
    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
    except psutil.NoSuchProcess:
        return 0.0
    return total


@dataclass
class Target:
    """Where one path sends requests and which processes it charges CPU to."""

    port: int
    pids: dict[str, int | None]
    envoy_admin: int | None = None
    metrics_port: int | None = None


@dataclass
class Run:
    """One measured load generator run."""

    connections: int
    result: dict[str, Any]
    cpu_ms_per_request: dict[str, float]
    messages_per_request: float | None
    outcomes: dict[str, float]
    other_cores: float  # CPU that processes outside the benchmark used meanwhile, in cores
    stolen_cores: float = 0.0  # CPU the hypervisor gave other guests meanwhile (steal), in cores


def machine_busy_seconds() -> tuple[float, float]:
    """CPU time every process on the machine has used, and the time stolen from it by the
    hypervisor (``/proc/stat``, all cores): on a shared virtual machine the second one says
    how much of the run's wall time the guest did not get."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(value) for value in fields[:8]]
    idle, steal = ticks[3] + ticks[4], ticks[7]  # idle + iowait; steal
    per_second = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle - steal) / per_second, steal / per_second


def envoy_messages(admin: int | None) -> float:
    """ext_proc messages Envoy sent so far (all ``stream_msgs_sent`` counters)."""
    if admin is None:
        return 0.0
    _status, text = http_get(admin, "/stats?filter=stream_msgs_sent")
    return sum(float(line.rpartition(": ")[2]) for line in text.decode().splitlines() if line)


def counters(metrics_port: int | None) -> dict[str, float]:
    """The sidecar's outcome, classify and commit counters (Prometheus text)."""
    if metrics_port is None:
        return {}
    _status, text = http_get(metrics_port, "/metrics")
    found: dict[str, float] = {}
    wanted = ("extproc_outcomes_total", "extproc_classify_results_total", "extproc_commit_results")
    for line in text.decode().splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            found[_short_label(name)] = float(value)
    return found


def _short_label(series: str) -> str:
    kind = series.split("{", 1)[0].removeprefix("extproc_").removesuffix("_total")
    labels = dict(
        part.split("=", 1) for part in series.partition("{")[2].rstrip("}").split(",") if part
    )
    value = labels.get("outcome") or labels.get("result") or "?"
    return f"{kind}:{value.strip(chr(34))}"


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One load generator invocation."""

    connections: int
    requests: int
    duration_s: float
    warmup: int
    body: Path
    bearer: str
    profile: Path | None = None  # py-spy's raw (collapsed) stacks of the sidecar go here


def measure(children: Children, target: Target, spec: LoadSpec) -> Run:
    argv = python_argv(
        "loadgen.py",
        "--port",
        str(target.port),
        "--body",
        str(spec.body),
        "--bearer",
        spec.bearer,
        "--nonce-marker",
        NONCE_MARKER,
        "--tag",
        secrets.token_hex(4),
        "--connections",
        str(spec.connections),
        "--requests",
        str(spec.requests),
        "--duration",
        str(spec.duration_s),
        "--warmup",
        str(spec.warmup),
    )
    loadgen = children.start("loadgen", argv, child_env(), pipes=True)
    try:
        return _measured(loadgen, target, spec, lambda: _profile(children, target, spec))
    finally:
        children.stop(loadgen)


def py_spy_binary() -> str:
    """py-spy next to this interpreter or on PATH (an optional tool, not a dependency)."""
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise RuntimeError("--py-spy needs py-spy: pip install py-spy")
    return found


def _profile(children: Children, target: Target, spec: LoadSpec) -> subprocess.Popen[bytes] | None:
    """Sample the sidecar with py-spy (native frames too) for the run's duration."""
    sidecar = target.pids.get("sidecar")
    if spec.profile is None or sidecar is None:
        return None
    argv = [py_spy_binary(), "record", "--pid", str(sidecar), "--native"]
    argv += ["--subprocesses", "--rate", "67", "--format", "raw", "--output", str(spec.profile)]
    argv += ["--duration", str(max(1, round(spec.duration_s)))]
    return children.start("py-spy", argv, child_env())


def _measured(
    loadgen: subprocess.Popen[bytes],
    target: Target,
    spec: LoadSpec,
    started: Callable[[], subprocess.Popen[bytes] | None],
) -> Run:
    assert loadgen.stdin is not None
    assert loadgen.stdout is not None
    if _readline(loadgen.stdout) != b"warm":
        raise RuntimeError("the load generator failed during warm-up (see loadgen.log)")
    pids = {**target.pids, "loadgen": loadgen.pid}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    (busy_before, steal_before), wall_before = machine_busy_seconds(), time.monotonic()
    messages_before = envoy_messages(target.envoy_admin)
    counters_before = counters(target.metrics_port)
    profiler = started()
    loadgen.stdin.write(b"go\n")
    loadgen.stdin.flush()
    line = _readline(loadgen.stdout)
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    busy_after, steal_after = machine_busy_seconds()
    busy, wall = busy_after - busy_before, max(1e-9, time.monotonic() - wall_before)
    ours = sum(after[name] - before[name] for name in pids)
    other_cores = max(0.0, busy - ours) / wall
    stolen_cores = (steal_after - steal_before) / wall
    messages = envoy_messages(target.envoy_admin) - messages_before
    counters_after = counters(target.metrics_port)
    if profiler is not None:
        profiler.wait(PROFILE_WAIT_S + spec.duration_s)  # it writes its file when it ends
    if not line:
        raise RuntimeError("the load generator did not report (see loadgen.log)")
    result: dict[str, Any] = codec.loads(line)
    done = max(1, int(result["requests"]))
    cpu = {name: (after[name] - before[name]) * 1000 / done for name in pids if pids[name]}
    outcomes = {
        key: value - counters_before.get(key, 0.0)
        for key, value in counters_after.items()
        if value - counters_before.get(key, 0.0) > 0
    }
    per_request = messages / done if target.envoy_admin is not None else None
    return Run(spec.connections, result, cpu, per_request, outcomes, other_cores, stolen_cores)


def _readline(stream: IO[bytes]) -> bytes:
    return stream.readline().strip()


# ---- the stacks ----


@dataclass
class Bench:
    """Options, the work directory, the children and what every path measured."""

    args: argparse.Namespace
    workdir: Path
    children: Children
    upstream_port: int = 0
    upstream_pid: int | None = None
    runs: dict[str, list[Run]] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)

    @property
    def stream(self) -> bool:
        return bool(self.args.stream)

    def body(self, name: str, *, model: str, marked: bool, nonce: bool) -> Path:
        path = self.workdir / f"{name}.json"
        data = chat_body(
            self.args.body_kb * 1024, model=model, marked=marked, nonce=nonce, stream=self.stream
        )
        path.write_bytes(data)
        return path

    def start_upstream(self) -> None:
        port = devstack.free_port()
        argv = python_argv("fast_upstream.py", "--port", str(port), "--model", MODEL)
        argv += ["--chunks", str(self.args.chunks)]
        argv += ["--interval-ms", str(self.args.chunk_interval_ms)]
        process = self.children.start("upstream", argv, child_env())
        wait_for(lambda: accepts(port), process, "the upstream")
        self.upstream_port, self.upstream_pid = port, process.pid

    @property
    def timing(self) -> EnvoyOptions:
        """The Envoy options the sidecar's settings must agree with."""
        deadline = self.args.classify_deadline_ms or EnvoyOptions().classify_deadline_ms
        return EnvoyOptions(max_body_bytes=8 << 20, classify_deadline_ms=deadline)

    def start_envoy(
        self, name: str, extproc: str | None, layout: Layout
    ) -> tuple[int, int, subprocess.Popen[bytes]]:
        """Envoy for ``extproc`` (``None``: the filter removed): its port, admin port, process."""
        port, admin = devstack.free_port(), devstack.free_port()
        options = EnvoyOptions(
            listen_host="127.0.0.1",
            listen_port=port,
            admin_port=admin,
            upstream_url=f"http://127.0.0.1:{self.upstream_port}",
            extproc_address=extproc or "127.0.0.1:9",
            max_body_bytes=self.timing.max_body_bytes,
            classify_deadline_ms=self.timing.classify_deadline_ms,
            layout=layout,
        )
        config = yaml.safe_load(render(options))
        if extproc is None:
            _remove_ext_proc(config)
        path = self.workdir / f"envoy-{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [devstack.envoy_binary(), "-c", str(path), "--disable-hot-restart"]
        argv += ["--concurrency", str(self.args.envoy_concurrency), "-l", "warning"]
        argv += ["--base-id", str(random.randrange(1, 1 << 20))]
        process = self.children.start(f"envoy-{name}", argv, child_env())
        wait_for(lambda: http_get(admin, "/ready")[0] == 200, process, f"envoy ({name})")
        wait_for(lambda: accepts(port), process, f"envoy ({name}) listener")
        return port, admin, process

    def load(
        self, name: str, target: Target, body: Path, bearer: str = "", requests: int = 0
    ) -> None:
        """Latency at the first connection count, throughput at the others.

        ``requests`` (when set) caps the latency run and skips the throughput runs.
        """
        counts = self.args.connections[:1] if requests else self.args.connections
        runs = []
        for index, connections in enumerate(counts):
            spec = LoadSpec(
                connections=connections,
                requests=(requests or self.args.requests) if index == 0 else 10_000_000,
                duration_s=self.args.latency_max_s if index == 0 else self.args.duration,
                warmup=2 if requests else max(self.args.warmup, 4 * connections),
                body=body,
                bearer=bearer,
                profile=self._profile_path(name, index, len(counts)),
            )
            run = measure(self.children, target, spec)
            runs.append(run)
            _progress(name, run)
        self.runs[name] = runs

    def _profile_path(self, name: str, index: int, runs: int) -> Path | None:
        """Profile the last (throughput) run of each path that has a sidecar."""
        folder: Path | None = self.args.py_spy
        if folder is None or index != runs - 1:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{name}.txt"


def _remove_ext_proc(config: dict[str, Any]) -> None:
    for listener in config["static_resources"]["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != EXTPROC_FILTER]
        for host in hcm["route_config"]["virtual_hosts"]:
            for route in host["routes"]:
                route.pop("typed_per_filter_config", None)


def _progress(name: str, run: Run) -> None:
    r = run.result
    cpu = " ".join(f"{k}={v:.3f}" for k, v in run.cpu_ms_per_request.items())
    print(
        f"  {name:9} c={run.connections:<3} n={r['requests']:<6} err={r['errors']} "
        f"p50={r['p50_ms']:.3f}ms p99={r['p99_ms']:.3f}ms {r['rps']:.0f} req/s  cpu ms/req: {cpu}",
        file=sys.stderr,
        flush=True,
    )


# ---- the paths ----


def run_baselines(bench: Bench, wanted: set[str]) -> None:
    body = bench.body("constant", model=MODEL, marked=True, nonce=False)
    upstream = {"upstream": bench.upstream_pid}
    if "upstream" in wanted:
        bench.load("upstream", Target(bench.upstream_port, upstream), body, BEARER)
    if "envoy" in wanted:
        port, admin, envoy = bench.start_envoy("plain", None, Layout.HEADERS_FIRST)
        pids = {"envoy": envoy.pid, **upstream}
        bench.load("envoy", Target(port, pids, envoy_admin=admin), body, BEARER)
        bench.children.stop(envoy)
    for name, layout in (("noop", Layout.HEADERS_FIRST), ("floor", Layout(bench.args.layout))):
        if name not in wanted:
            continue
        grpc_port = devstack.free_port()
        mode = bench.args.noop_response_mode or ("streamed" if bench.stream else "buffered")
        if name == "floor":
            mode = bench.args.floor_response_mode or mode
        argv = python_argv("noop_extproc.py", "--port", str(grpc_port), "--response-mode", mode)
        sidecar = bench.children.start(name, argv, child_env())
        wait_for(functools.partial(accepts, grpc_port), sidecar, "the no-op ext_proc server")
        noop = f"127.0.0.1:{grpc_port}"
        port, admin, envoy = bench.start_envoy(name, noop, layout)
        pids = {"envoy": envoy.pid, "sidecar": sidecar.pid, **upstream}
        bench.load(name, Target(port, pids, envoy_admin=admin), body, BEARER)
        bench.children.stop(envoy)
        bench.children.stop(sidecar)


BEARER = "sk-bench-" + secrets.token_hex(8)


def start_postgres(bench: Bench) -> tuple[str, int]:
    """The embedded PostgreSQL on a free port; its ``extproc`` database URL and pid."""
    import psycopg

    user = devstack.pg_system_user()
    data = bench.workdir / "postgres"
    devstack.init_pg_data(data, user)
    spec = devstack.postgres_spec(data, devstack.free_port(), user)
    process = bench.children.start(
        "postgres", spec.argv, child_env(), user=spec.user, stop_signal=spec.stop_signal
    )
    port = spec.argv[spec.argv.index("-p") + 1]
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def created() -> bool:
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=2) as conn:
                conn.execute("CREATE DATABASE extproc")
        except psycopg.OperationalError:
            return False
        return True

    wait_for(created, process, "PostgreSQL")
    return f"postgresql://postgres@127.0.0.1:{port}/extproc", process.pid


def extproc_cli(database: str, *args: str) -> None:
    done = subprocess.run(
        list(devstack.extproc_argv(*args)),
        env=child_env({"EXTPROC_DATABASE_URL": database}),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"extproc {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def start_slow_tokenizer(bench: Bench, tokenizer: Path) -> str:
    """The late-answering tokenizer service for the ``slow`` path; its URL."""
    port = devstack.free_port()
    argv = python_argv("slow_tokenizer.py", "--port", str(port), "--alias", SLOW_MODEL)
    argv += ["--tokenizer", str(tokenizer), "--delay-s", str(bench.args.slow_classify_s)]
    process = bench.children.start("slow-tokenizer", argv, child_env())
    wait_for(lambda: accepts(port), process, "the slow tokenizer service")
    return f"http://127.0.0.1:{port}"


def start_extproc(bench: Bench, database: str) -> tuple[str, int, subprocess.Popen[bytes]]:
    from extproc.adapters.tokenizer_files import cached_tokenizer_json
    from extproc.commands.health import probe

    tokenizer = cached_tokenizer_json(bench.args.tokenizer)
    address = f"127.0.0.1:{devstack.free_port()}"
    metrics = devstack.free_port()
    env = {
        "EXTPROC_LISTEN": address,
        "EXTPROC_DATABASE_URL": database,
        "EXTPROC_PRINCIPAL_SOURCE": "key_hash",
        "EXTPROC_TOKENIZERS": f"{MODEL}={tokenizer},{DISABLED_MODEL}={tokenizer}",
        "EXTPROC_METRICS_LISTEN": f"127.0.0.1:{metrics}",
        "EXTPROC_WORKERS": str(bench.args.workers),
        "EXTPROC_SHUTDOWN_GRACE_S": "3",
        "EXTPROC_SCRUB_PROVIDER_CACHE": bench.args.scrub_provider_cache,
        **bench.timing.server_env(),
    }
    if "slow" in bench.args.only and bench.stream:
        env["EXTPROC_TOKENIZER_URL"] = start_slow_tokenizer(bench, Path(tokenizer))
        env["EXTPROC_TOKENIZER_TIMEOUT_MS"] = str(int(bench.args.slow_classify_s * 1000) + 2000)
    process = bench.children.start("extproc", devstack.extproc_argv("serve"), child_env(env))
    wait_for(lambda: probe(address, timeout=1.0) == "SERVING", process, "extproc serve")
    return address, metrics, process


def run_extproc(bench: Bench, wanted: set[str]) -> None:
    database, pg_pid = start_postgres(bench)
    extproc_cli(database, "migrate")
    enable = ("models", "enable", MODEL, "--min-prefix-tokens", str(MIN_PREFIX_TOKENS))
    extproc_cli(database, *enable)
    slow = ("models", "enable", SLOW_MODEL, "--min-prefix-tokens", str(MIN_PREFIX_TOKENS))
    extproc_cli(database, *slow)
    address, metrics, sidecar = start_extproc(bench, database)
    port, admin, envoy = bench.start_envoy("extproc", address, Layout(bench.args.layout))
    pids = {"envoy": envoy.pid, "sidecar": sidecar.pid, "postgres": pg_pid}
    target = Target(port, {**pids, "upstream": bench.upstream_pid}, admin, metrics)
    regimes = (
        ("write", {"model": MODEL, "marked": True, "nonce": True}, "cache_creation_input_tokens"),
        ("read", {"model": MODEL, "marked": True, "nonce": False}, "cache_read_input_tokens"),
        ("inactive", {"model": DISABLED_MODEL, "marked": False, "nonce": False}, ""),
    )
    for name, shape, field_name in regimes:
        if name not in wanted:
            continue
        body = bench.body(name, **shape)  # type: ignore[arg-type]
        bench.checks[name] = check_regime(port, body, field_name, bench.stream)
        bench.load(name, target, body, BEARER)
    if "slow" in wanted and bench.stream:
        body = bench.body("slow", model=SLOW_MODEL, marked=True, nonce=True)
        bench.load("slow", target, body, BEARER, requests=bench.args.slow_requests)


# ---- checking that each regime is what it claims ----


def post(port: int, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"content-type": "application/json", "authorization": f"Bearer {BEARER}"}
        conn.request("POST", PATH, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def usage_of(data: bytes, stream: bool) -> dict[str, Any]:
    if not stream:
        found: dict[str, Any] = codec.loads(data).get("usage") or {}
        return found
    usage: dict[str, Any] = {}
    for line in data.splitlines():
        if line.startswith(b"data: {"):
            frame = codec.loads(line[len(b"data: ") :])
            usage = frame.get("usage") or usage
    return usage


def check_regime(port: int, template: Path, field_name: str, stream: bool) -> str:
    """Send the regime's request (twice for reads) and say what the usage showed."""
    body = template.read_bytes()
    unique = secrets.token_hex(len(NONCE_MARKER) // 2).encode()
    first = body.replace(NONCE_MARKER.encode(), unique, 1)
    status, data = post(port, first)
    if field_name == "cache_read_input_tokens":
        time.sleep(0.5)  # the first request's commit lands after its reply
        status, data = post(port, body)
    usage = usage_of(data, stream) if status == 200 else {}
    if not field_name:
        extra = sorted(k for k in usage if k.startswith("cache_"))
        verdict = "no cache fields" if not extra else f"unexpected {extra}"
        return f"status {status}, {verdict}"
    return f"status {status}, {field_name}={usage.get(field_name)}"


# ---- the report ----


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"nproc {os.cpu_count()}, CPU {model}, load average at start {load}"


LABELS = {
    "upstream": "1. upstream directly",
    "envoy": "2. Envoy alone",
    "noop": "3. Envoy + do-nothing grpc.aio ext_proc",
    "floor": "3b. the same, in extproc's layout (the floor)",
    "write": "4a. Envoy + extproc, cache writes",
    "read": "4b. Envoy + extproc, cache reads",
    "inactive": "5. Envoy + extproc, disabled model, unmarked",
    "slow": "6. Envoy + extproc, cache writes, classify slowed",
}


def table(bench: Bench) -> str:
    counts = bench.args.connections
    at = f"{counts[0]} / {counts[-1]} conn"
    head = (
        "| path | p50 ms | p90 ms | p99 ms | TTFB p50 ms | added p50 vs Envoy alone "
        f"| req/s at {counts[-1]} conn | Envoy CPU ms/req ({at}) | sidecar CPU ms/req ({at}) "
        f"| PostgreSQL CPU ms/req ({at}) | ext_proc msgs/req "
        f"| upstream CPU ms/req ({at}) | loadgen CPU ms/req ({at}) | errors |"
    )
    lines = [head, "|" + "---|" * 14]
    envoy_runs = bench.runs.get("envoy")
    base = envoy_runs[0].result["p50_ms"] if envoy_runs else None
    for name in PATHS:
        runs = bench.runs.get(name)
        if not runs:
            continue
        latency, load = runs[0].result, runs[-1]
        cpu = (runs[0].cpu_ms_per_request, load.cpu_ms_per_request)
        added = "—" if base is None or name in ("upstream", "envoy") else _signed(latency, base)
        msgs = "—" if load.messages_per_request is None else f"{load.messages_per_request:.1f}"
        errors = sum(int(r.result["errors"]) for r in runs)
        lines.append(
            f"| {LABELS[name]} | {latency['p50_ms']:.3f} | {latency['p90_ms']:.3f} "
            f"| {latency['p99_ms']:.3f} | {latency.get('ttfb_p50_ms', 0.0):.3f} | {added} "
            f"| {load.result['rps'] if len(runs) > 1 else 0:,.0f} "
            f"| {_cpu(cpu, 'envoy')} | {_cpu(cpu, 'sidecar')} | {_cpu(cpu, 'postgres')} | {msgs} "
            f"| {_cpu(cpu, 'upstream')} | {_cpu(cpu, 'loadgen')} | {errors} |"
        )
    return "\n".join(lines)


def _signed(latency: dict[str, Any], base: float) -> str:
    return f"{latency['p50_ms'] - base:+.3f} ms"


def _cpu(cpu: tuple[dict[str, float], dict[str, float]], name: str) -> str:
    """CPU ms per request at the first and the last connection count."""
    if name not in cpu[1]:
        return "—"
    return f"{cpu[0][name]:.2f} / {cpu[1][name]:.2f}"


def notes(bench: Bench) -> str:
    lines = []
    for name, verdict in bench.checks.items():
        lines.append(f"- check {name}: {verdict}")
    for name in PATHS:
        for run in bench.runs.get(name, []):
            lines.append(
                f"- {name} at {run.connections} conn: other processes on the machine used "
                f"{run.other_cores:.2f} cores meanwhile, the hypervisor took "
                f"{run.stolen_cores:.2f} (steal)"
            )
            if run.outcomes:
                shown = ", ".join(f"{k}={v:g}" for k, v in sorted(run.outcomes.items()))
                lines.append(f"- {name} at {run.connections} conn: {shown}")
    return "\n".join(lines)


def _sidecar_ratio(bench: Bench, name: str) -> float | None:
    """Sidecar CPU per request at the last connection count, over the do-nothing server's."""
    runs, noop = bench.runs.get(name), bench.runs.get("noop")
    if not runs or not noop or len(runs) < 2:
        return None
    ours = runs[-1].cpu_ms_per_request.get("sidecar")
    theirs = noop[-1].cpu_ms_per_request.get("sidecar")
    return None if ours is None or not theirs else ours / theirs


def _missed(bench: Bench, name: str) -> float:
    runs = bench.runs.get(name, [])
    return sum(r.outcomes.get("classify_results:deadline_exceeded", 0.0) for r in runs)


def _added(bench: Bench, name: str) -> float | None:
    runs, envoy = bench.runs.get(name), bench.runs.get("envoy")
    if not runs or not envoy:
        return None
    return float(runs[0].result["p50_ms"]) - float(envoy[0].result["p50_ms"])


def targets(bench: Bench) -> str:
    """Each target with its figure from this run, and whether it is met."""
    lines = ["Targets (sidecar CPU per request at the last connection count vs do-nothing):"]
    limits: list[tuple[str, float]] = [("inactive", 0.6), ("read", 1.2 if bench.stream else 1.0)]
    limits += [] if bench.stream else [("write", 4.0)]
    for name, limit in limits:
        ratio = _sidecar_ratio(bench, name)
        if ratio is not None:
            lines.append(_target(f"{name} CPU {ratio:.2f}x", ratio <= limit, f"<= {limit}x"))
    for name in ("write", "read", "inactive"):
        if name in bench.runs:
            missed = _missed(bench, name)
            lines.append(_target(f"{name} deadlines missed {missed:g}", missed == 0, "= 0"))
    read, noop = _added(bench, "read"), _added(bench, "noop")
    if read is not None and noop is not None:
        lines.append(_target(f"read added p50 {read:+.3f} ms", read <= noop, f"<= {noop:+.3f}"))
    lines += _ttfb_target(bench)
    floor = _sidecar_ratio(bench, "floor")
    if floor is not None:
        lines.append(
            f"- for scale: the do-nothing server in extproc's layout costs {floor:.2f}x "
            "(the messages alone, no work)"
        )
    return "\n".join(lines)


def _ttfb_target(bench: Bench) -> list[str]:
    slow, write = bench.runs.get("slow"), bench.runs.get("write")
    if not slow or not write:
        return []
    fast_ms = float(write[0].result["ttfb_p50_ms"])
    slow_ms = float(slow[0].result["ttfb_p50_ms"])
    unchanged = slow_ms <= fast_ms + max(2.0, 0.1 * fast_ms)
    figure = f"TTFB p50 {slow_ms:.3f} ms with a {bench.args.slow_classify_s:g} s classify"
    return [_target(figure, unchanged, f"~ {fast_ms:.3f} ms without")]


def _target(figure: str, met: bool, limit: str) -> str:
    return f"- {figure} (target {limit}): {'met' if met else 'NOT met'}"


# ---- main ----


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_proxy.py",
        description="extproc's cost next to the upstream alone, Envoy alone and a do-nothing "
        "ext_proc server, measured in one run on 127.0.0.1.",
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests at 1 connection")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of each throughput run"
    )
    parser.add_argument(
        "--latency-max-s", type=float, default=60.0, help="cap on the 1-connection run"
    )
    parser.add_argument("--connections", type=_counts, default=[1, 32], help="e.g. 1,32")
    parser.add_argument("--body-kb", type=int, default=16, help="request body size")
    parser.add_argument("--stream", action="store_true", help="SSE answers instead of JSON")
    parser.add_argument("--chunks", type=int, default=20, help="SSE content frames")
    parser.add_argument(
        "--chunk-interval-ms", type=float, default=1.0, help="upstream pause between SSE frames"
    )
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    parser.add_argument("--only", type=_paths, default=list(PATHS), help=",".join(PATHS))
    parser.add_argument(
        "--noop-response-mode",
        choices=("buffered", "streamed", "none"),
        help="override the do-nothing server's response body mode (none: 3 messages)",
    )
    parser.add_argument(
        "--floor-response-mode",
        choices=("buffered", "streamed", "none"),
        help="the floor's response body mode (default: the do-nothing server's; none: what an "
        "unwatched inactive answer costs, 2 messages in the body-first layout)",
    )
    parser.add_argument("--envoy-concurrency", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="EXTPROC_WORKERS")
    parser.add_argument(
        "--classify-deadline-ms",
        type=int,
        default=0,
        help="EXTPROC_CLASSIFY_DEADLINE_MS (default: the server's own)",
    )
    parser.add_argument(
        "--layout",
        choices=[layout.value for layout in Layout],
        default=Layout.BODY_FIRST.value,
        help="the Envoy layout of the extproc paths (the do-nothing server gets every phase)",
    )
    parser.add_argument(
        "--scrub-provider-cache",
        choices=("true", "false"),
        default="true",
        help="EXTPROC_SCRUB_PROVIDER_CACHE; the fast upstream writes no cache fields, so false "
        "is an operator's honest setting for it (inactive answers then go unwatched)",
    )
    parser.add_argument(
        "--slow-classify-s", type=float, default=2.0, help="the slow path's tokenizer delay"
    )
    parser.add_argument(
        "--slow-requests", type=int, default=30, help="requests of the slow path (1 connection)"
    )
    parser.add_argument("--tokenizer", default="qwen2.5", help="packaged tokenizer source")
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="profile the sidecar under load with py-spy (if installed) into DIR/<path>.txt; "
        "the profiled runs' numbers are perturbed",
    )
    parser.add_argument("--json", type=Path, help="also write every run's raw numbers here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    return parser


def _counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, e.g. 1,32")
    return counts


def _paths(text: str) -> list[str]:
    chosen = [part for part in text.split(",") if part]
    unknown = set(chosen) - set(PATHS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown paths {sorted(unknown)}")
    return chosen


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    workdir.chmod(0o755)  # PostgreSQL may run as another user
    children = Children(workdir)
    bench = Bench(args, workdir, children)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    header = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}"
    print(f"extproc benchmark: {header}", file=sys.stderr, flush=True)
    try:
        return _run(bench, header)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping", file=sys.stderr)
        return 130
    except RuntimeError as err:
        print(f"bench_proxy: {err}", file=sys.stderr)
        for name, _process, _sig in children.running:
            print(f"--- {name}.log\n{children.tail(name)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.stop_all()
        if args.keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(bench: Bench, header: str) -> int:
    wanted = set(bench.args.only)
    if bench.args.py_spy is not None:
        py_spy_binary()
    bench.start_upstream()
    run_baselines(bench, wanted)
    if wanted & {"write", "read", "inactive"}:
        run_extproc(bench, wanted)
    command = " ".join(["benchmarks/bench_proxy.py", *sys.argv[1:]])
    kind = f"{bench.args.body_kb} KB chat request, " + (
        f"SSE answer ({bench.args.chunks} content frames, "
        f"{bench.args.chunk_interval_ms:g} ms apart)"
        if bench.stream
        else "JSON answer"
    )
    scrub = "on" if bench.args.scrub_provider_cache == "true" else "off"
    kind += f"; provider cache fields scrubbed from inactive answers: {scrub}"
    print(f"\n{header}\ncommand: {command}\n{kind}\n")
    print(table(bench))
    print()
    print(notes(bench))
    print()
    print(targets(bench))
    if bench.args.json is not None:
        raw = {name: [vars(run) for run in runs] for name, runs in bench.runs.items()}
        bench.args.json.write_bytes(codec.pretty({"header": header, "runs": raw}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
