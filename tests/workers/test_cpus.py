"""``EXTPROC_WORKERS=auto``: the CPUs a process may use, from cgroup files and its affinity."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from extproc.core import codec
from extproc.cpus import cpu_count, usable_cpus

V2_ROOT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"
V1_CPU = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct"
V1_MEMORY = "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory"


def v2(cgroup: str = "/", mount: str = V2_ROOT, **cpu_max: str) -> dict[str, str]:
    """A cgroup v2 system: the process in ``cgroup``; ``cpu_max`` maps a directory to its file."""
    files = {"/proc/self/cgroup": f"0::{cgroup}\n", "/proc/self/mountinfo": mount + "\n"}
    files |= {f"{directory}/cpu.max": text for directory, text in _dirs(cpu_max).items()}
    return files


def v1(quota: str, period: str = "100000", cgroup: str = "/") -> dict[str, str]:
    """A cgroup v1 system with the cpu controller mounted with cpuacct."""
    directory = "/sys/fs/cgroup/cpu,cpuacct" + cgroup.rstrip("/")
    return {
        "/proc/self/cgroup": f"5:memory:{cgroup}\n4:cpu,cpuacct:{cgroup}\n",
        "/proc/self/mountinfo": f"{V1_MEMORY}\n{V1_CPU}\n",
        f"{directory}/cpu.cfs_quota_us": quota + "\n",
        f"{directory}/cpu.cfs_period_us": period + "\n",
    }


def _dirs(named: dict[str, str]) -> dict[str, str]:
    """Keyword names to directories: ``root`` is the mount point, ``a__b`` is ``a/b`` under it."""
    out = {}
    for name, text in named.items():
        relative = "" if name == "root" else "/" + name.replace("__", "/")
        out["/sys/fs/cgroup" + relative] = text + "\n"
    return out


HYBRID = {
    **v1("250000"),
    "/proc/self/cgroup": "4:cpu,cpuacct:/\n0::/\n",
    "/proc/self/mountinfo": f"{V1_CPU}\n{V2_ROOT.replace('/sys/fs/cgroup ', '/sys/fs/unified ')}\n",
    "/sys/fs/unified/cpu.max": "150000 100000\n",
}

CASES = [
    pytest.param({}, 8, 8, id="no-cgroup-files"),
    pytest.param(v2(root="max 100000"), 8, 8, id="v2-no-quota"),
    pytest.param(v2(root="200000 100000"), 8, 2, id="v2-two-cpus"),
    pytest.param(v2(root="150000 100000"), 8, 2, id="v2-fraction-rounds-up"),
    pytest.param(v2(root="50000 100000"), 8, 1, id="v2-half-a-cpu-is-one"),
    pytest.param(v2(root="1000 100000"), 8, 1, id="v2-tiny-quota-is-one"),
    pytest.param(v2(root="400000 100000"), 2, 2, id="v2-capped-by-affinity"),
    pytest.param(v2(root="300000 50000"), 8, 6, id="v2-short-period"),
    pytest.param(v2(root="garbage"), 8, 8, id="v2-malformed"),
    pytest.param(v2(root=""), 8, 8, id="v2-empty-file"),
    pytest.param(v2(root="0 100000"), 8, 8, id="v2-zero-quota-ignored"),
    pytest.param(v2(), 8, 8, id="v2-root-cgroup-has-no-cpu-max"),
    pytest.param(
        v2("/kubepods/pod1/ctr", kubepods__pod1__ctr="max 100000", kubepods__pod1="300000 100000"),
        8,
        3,
        id="v2-parent-quota-binds",
    ),
    pytest.param(
        v2("/kubepods/pod1/ctr", kubepods__pod1__ctr="100000 100000", kubepods="400000 100000"),
        8,
        1,
        id="v2-smallest-quota-wins",
    ),
    pytest.param(
        v2("/docker/abc", V2_ROOT.replace(" / /sys", " /docker/abc /sys"), root="200000 100000"),
        8,
        2,
        id="v2-mounted-at-its-own-cgroup",
    ),
    pytest.param(
        v2("/elsewhere", V2_ROOT.replace(" / /sys", " /docker/abc /sys"), root="200000 100000"),
        8,
        2,
        id="v2-cgroup-outside-the-mount",
    ),
    pytest.param(
        {
            "/proc/self/cgroup": "0::/a b\n",
            "/proc/self/mountinfo": V2_ROOT.replace("/sys/fs/cgroup", "/sys/fs/my\\040cgroup"),
            "/sys/fs/my cgroup/a b/cpu.max": "200000 100000",
        },
        8,
        2,
        id="v2-escaped-space-in-mount-point",
    ),
    pytest.param(v1("300000"), 8, 3, id="v1-three-cpus"),
    pytest.param(v1("-1"), 8, 8, id="v1-no-quota"),
    pytest.param(v1("150000"), 8, 2, id="v1-fraction-rounds-up"),
    pytest.param(v1("300000", period="0"), 8, 8, id="v1-zero-period-ignored"),
    pytest.param(v1("300000", cgroup="/docker/abc"), 8, 3, id="v1-nested-cgroup"),
    pytest.param(
        {k: v for k, v in v1("300000").items() if not k.endswith("period_us")},
        8,
        8,
        id="v1-missing-period",
    ),
    pytest.param(
        {k: v for k, v in v1("300000").items() if k != "/proc/self/mountinfo"},
        8,
        8,
        id="no-mountinfo",
    ),
    pytest.param(HYBRID, 8, 2, id="v1-and-v2-smallest-wins"),
    pytest.param({}, 0, 1, id="at-least-one"),
]


@pytest.mark.parametrize(("files", "affinity", "expected"), CASES)
def test_cpu_count(files: dict[str, str], affinity: int, expected: int) -> None:
    assert cpu_count(files.get, affinity) == expected


def _check(cpus: set[int] | None) -> dict[str, object]:
    """What ``extproc serve --check`` prints with ``auto`` workers, on ``cpus`` if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
    env |= {"EXTPROC_DATABASE_URL": "postgresql://db/extproc", "EXTPROC_WORKERS": "auto"}
    pin = f"os.sched_setaffinity(0, {cpus!r})" if cpus else "pass"
    script = f"import os, sys\n{pin}\nfrom extproc.cli import main\nsys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", script, "serve", "--check"]
    out = subprocess.run(argv, env=env, capture_output=True, check=True).stdout
    shown: dict[str, object] = codec.loads(out)
    return shown


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs an affinity mask")
def test_serve_check_shows_the_resolved_worker_count() -> None:
    assert _check(None)["workers"] == usable_cpus()
    assert _check({min(os.sched_getaffinity(0))})["workers"] == 1
