"""What serving loads and depends on: no local-stack tool, and settings without a tokenizer."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEV_ONLY = ("aiohttp", "httpx", "yaml", "extproc.devtools")


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(done.stdout.split())


def _dev_only(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == d or m.startswith(d + ".") for d in DEV_ONLY)}


def test_serving_loads_no_local_stack_tool() -> None:
    modules = loaded_after(
        "from extproc import app, cli\n"
        "cli.build_parser(['serve', '--check'])\n"
        "from extproc.commands import serve"
    )
    assert "extproc.app" in modules
    assert _dev_only(modules) == set()


def test_every_command_is_listed_by_help() -> None:
    modules = loaded_after("from extproc import cli\ncli.build_parser([])")
    assert {"extproc.commands.dev", "extproc.commands.demo_upstream"} <= modules
    assert "extproc.devtools.devstack" in modules  # help loads them all


def test_the_settings_load_no_tokenizer_library() -> None:
    modules = loaded_after("from extproc import config\nconfig.Settings")
    assert "extproc.config" in modules
    assert not {"tokenizers", "extproc.adapters.tokenizers"} & modules


def test_the_runtime_dependencies_leave_out_the_dev_tools() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {_name(d) for d in project["dependencies"]}
    dev = _extra(project, "dev")
    assert not {"aiohttp", "httpx", "pyyaml"} & runtime
    assert {"aiohttp", "httpx", "pyyaml"} <= dev


def _extra(project: dict, name: str) -> set[str]:
    """The names an extra brings, through the extras of this project it names."""
    names = set()
    for requirement in project["optional-dependencies"][name]:
        if requirement.startswith(project["name"] + "["):
            for inner in requirement.split("[", 1)[1].rstrip("]").split(","):
                names |= _extra(project, inner.strip())
        else:
            names.add(_name(requirement))
    return names


def _name(requirement: str) -> str:
    for stop in "<>=[;~! ":
        requirement = requirement.split(stop)[0]
    return requirement.lower()
