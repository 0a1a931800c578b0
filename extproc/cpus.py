"""How many CPUs this process may use: its cgroup CPU quota (v2 or v1), capped by its affinity.

Rules:

* cgroup v2: ``cpu.max`` holds ``<quota> <period>`` in microseconds, ``max`` for no quota;
  cgroup v1: ``cpu.cfs_quota_us`` (``-1`` for no quota) over ``cpu.cfs_period_us``.
* Every cgroup from the process's own (``/proc/self/cgroup``) up to the root of the hierarchy
  as mounted (``/proc/self/mountinfo``) is read: a parent's quota binds its children, so the
  smallest quota wins. v1 and v2 hierarchies are both read when both are mounted.
* A quota is rounded up to whole CPUs (1.5 CPUs of quota is 2) and is at least 1.
* The result never exceeds the CPUs in the scheduler affinity mask, and is at least 1.
* A missing, unreadable or malformed file counts as no quota.

``cpu_count`` is pure: it reads files only through the ``read`` function it is given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

Read = Callable[[str], str | None]
"""The text of the file at a path, or ``None`` when it cannot be read."""

CGROUP = "/proc/self/cgroup"
MOUNTINFO = "/proc/self/mountinfo"
V2 = "cgroup2"
V1 = "cgroup"
_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes a space in a path as \040


@dataclass(frozen=True, slots=True)
class Mount:
    """A cgroup hierarchy as mounted: which one, its root inside the hierarchy, where it is."""

    kind: str
    root: str
    point: str


def usable_cpus() -> int:
    """The CPUs this process may use, from its cgroups and its affinity mask."""
    return cpu_count(_read_text, _affinity())


def cpu_count(read: Read, affinity: int) -> int:
    """``affinity`` CPUs, or fewer when a cgroup quota allows fewer; never less than 1."""
    quotas = [
        cpus for kind, directory in cgroup_dirs(read) if (cpus := quota(read, kind, directory))
    ]
    return max(1, min([affinity, *quotas]))


def cgroup_dirs(read: Read) -> Iterator[tuple[str, str]]:
    """``(kind, directory)`` of every cgroup whose CPU quota binds this process."""
    mounts = parse_mounts(read(MOUNTINFO) or "")
    for line in (read(CGROUP) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for mount in mounts:
            if _serves(mount, hierarchy, controllers):
                yield from ((mount.kind, d) for d in _ancestors(mount.point, mount.root, path))


def _serves(mount: Mount, hierarchy: str, controllers: str) -> bool:
    if mount.kind == V2:
        return hierarchy == "0" and controllers == ""
    return "cpu" in controllers.split(",")


def parse_mounts(mountinfo: str) -> list[Mount]:
    """The cgroup v2 mounts, and the v1 mounts of the ``cpu`` controller, in ``mountinfo``."""
    mounts = []
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        parts, kinds = fields.split(), tail.split()
        if len(parts) < 5 or len(kinds) < 3:
            continue
        is_cpu_v1 = kinds[0] == V1 and "cpu" in kinds[2].split(",")
        if kinds[0] == V2 or is_cpu_v1:
            mounts.append(Mount(kinds[0], _unescape(parts[3]), _unescape(parts[4])))
    return mounts


def _unescape(path: str) -> str:
    return _ESCAPE.sub(lambda match: chr(int(match[1], 8)), path)


def _ancestors(point: str, root: str, path: str) -> Iterator[str]:
    """The mounted directories of cgroup ``path`` and of its parents, down to ``point``.

    A path outside the mounted root (another cgroup namespace) leaves the mount point alone.
    """
    if root != "/" and path != root and not path.startswith(root.rstrip("/") + "/"):
        yield point
        return
    parts = [part for part in path.removeprefix(root if root != "/" else "").split("/") if part]
    base = point.rstrip("/")
    for depth in range(len(parts), -1, -1):
        yield "/".join([base, *parts[:depth]]) or "/"


def quota(read: Read, kind: str, directory: str) -> int | None:
    """The whole CPUs the quota of the cgroup at ``directory`` allows, ``None`` for no quota."""
    if kind == V2:
        text = read(f"{directory}/cpu.max") or ""
        fields = text.split()
        return _cpus(*fields) if len(fields) == 2 else None
    return _cpus(
        read(f"{directory}/cpu.cfs_quota_us") or "", read(f"{directory}/cpu.cfs_period_us") or ""
    )


def _cpus(quota_us: str, period_us: str) -> int | None:
    try:
        quota_value, period = int(quota_us), int(period_us)
    except ValueError:
        return None  # "max", an empty or a malformed file
    if quota_value <= 0 or period <= 0:
        return None
    return max(1, -(-quota_value // period))


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _affinity() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
