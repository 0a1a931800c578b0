"""Summarise py-spy raw profiles of the sidecar (``bench_proxy.py --py-spy DIR``): where CPU goes.

py-spy with ``--native`` samples every thread, waiting ones included, so samples whose leaf
frame is a blocking wait (epoll, a lock, a condition variable, a futex) are dropped first. The
rest is put in one bucket per sample, by the innermost frame that names a known component:
the tokenizer, psycopg, OpenTelemetry, logging, orjson, hashing, protobuf, one of this
project's modules, grpc (its Cython layer or its C core), else the asyncio loop or "other".
A second table lists this project's functions by inclusive share (a function and all it calls).
Usage: ``python benchmarks/profile_summary.py DIR/write.txt [more.txt ...]``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

IDLE_LEAVES = re.compile(
    r"epoll_wait|epoll_pwait|PyThread_acquire_lock|pthread_cond_(timed)?wait|sem_(timed)?wait"
    r"|__futex|futex_wait|nanosleep|clock_nanosleep|\bpoll \(libc|select \(libc"
)
# A bare ``syscall`` leaf under grpc's core is its futex-based wait (gpr/absl), also idle.
GRPC_WAIT = re.compile(r"^syscall \(libc")
BUCKETS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("tokenizer (HF tokenizers)", re.compile(r"tokenizers|tokenizers\.py|tokenizer_files")),
    ("psycopg / libpq", re.compile(r"psycopg|libpq")),
    ("OpenTelemetry metrics", re.compile(r"opentelemetry|telemetry\.py|prometheus")),
    ("logging", re.compile(r"logging/|log_event")),
    ("JSON (orjson)", re.compile(r"orjson|codec\.py")),
    ("hashing (sha256)", re.compile(r"hashlib|sha256|libcrypto|SHA256")),
    ("protobuf (upb)", re.compile(r"_message\.abi3|PyUpb|upb_|FromString|SerializeToString")),
)
OURS = re.compile(r"\(((?:extproc/)?(?:core|adapters)?/?[a-z_]+\.py):\d+\)")
PROJECT_FILES = re.compile(
    r"servicer|proto|session|markers|prefix|usage|sse|classify|request|phases|verdict"
    r"|pg_resolvers|postgres|model|errors|noop_extproc"
)
GRPC = re.compile(r"grpc|cygrpc")
ASYNCIO = re.compile(r"asyncio|_asynciomodule|selectors|selectmodule")
FUNCTION = re.compile(r"^([\w.<>]+) \(([\w/]+\.py):\d+\)$")
ROOT_FUNCTIONS = frozenset({"main", "run", "<module>", "Pump.answer.__wrapped__"})


@dataclass
class Profile:
    """Counts of one profile."""

    total: int = 0
    idle: int = 0
    buckets: Counter[str] = field(default_factory=Counter)
    functions: Counter[str] = field(default_factory=Counter)

    @property
    def busy(self) -> int:
        return self.total - self.idle


def is_idle(frames: list[str]) -> bool:
    """A wait: the blocking call is the leaf, or only anonymous libc frames follow it."""
    leaf = frames[-1] if frames else ""
    for frame in reversed(frames[-4:]):
        if IDLE_LEAVES.search(frame):
            return True
        if not frame.startswith("0x"):
            break
    near_leaf = " ".join(frames[-4:])
    return bool(GRPC_WAIT.search(leaf) and "cygrpc" in near_leaf and "sendmsg" not in near_leaf)


def bucket(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in BUCKETS:
            if pattern.search(frame):
                return name
        mine = _project_file(frame)
        if mine is not None:
            return f"project: {mine}"
        if GRPC.search(frame):
            return "grpc (Cython layer and C core)"
    if any(ASYNCIO.search(frame) for frame in frames):
        return "asyncio event loop"
    return "other (interpreter, libc)"


def _project_file(frame: str) -> str | None:
    found = OURS.search(frame)
    if found is None:
        return None
    name = found.group(1).rsplit("/", 1)[-1].removesuffix(".py")
    return f"{name}.py" if PROJECT_FILES.fullmatch(name) else None


def project_functions(frames: list[str]) -> set[str]:
    """This project's functions on the stack (each counted once per sample)."""
    seen: set[str] = set()
    for frame in frames:
        found = FUNCTION.match(frame)
        if found is None or _project_file(frame) is None:
            continue
        if found.group(1) in ROOT_FUNCTIONS:
            continue
        seen.add(f"{found.group(1)} ({found.group(2).rsplit('/', 1)[-1]})")
    return seen


def read(path: Path) -> Profile:
    profile = Profile()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")[1:]  # the first entry names the process
        profile.total += count
        if is_idle(frames):
            profile.idle += count
            continue
        profile.buckets[bucket(frames)] += count
        for name in project_functions(frames):
            profile.functions[name] += count
    return profile


def report(path: Path, profile: Profile, top: int) -> str:
    busy = max(1, profile.busy)
    lines = [
        f"== {path.name}: {profile.total} samples, {profile.busy} busy "
        f"({profile.idle} waiting, dropped)",
        "  share  bucket (innermost named frame)",
    ]
    lines += [f"  {100 * n / busy:5.1f}%  {name}" for name, n in profile.buckets.most_common()]
    lines.append("  share  project function, inclusive")
    lines += [f"  {100 * n / busy:5.1f}%  {name}" for name, n in profile.functions.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25, help="project functions to list")
    args = parser.parse_args(argv)
    for path in args.profiles:
        print(report(path, read(path), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
