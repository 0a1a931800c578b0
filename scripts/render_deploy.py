"""Rewrite the Envoy configurations that are copies of extproc/envoy/envoy.yaml.

The packaged bootstrap is the one source. This script writes its copies: envoy/envoy.yaml
(identical), envoy/envoy-fail-open.yaml (its fail-open twin), the compose bootstrap and the
Kubernetes ConfigMap (rendered for their upstreams). The deployment tests fail when a copy
drifts; run this after editing the bootstrap:

    .venv/bin/python scripts/render_deploy.py
"""

from __future__ import annotations

from pathlib import Path

from extproc.devtools.envoyconf import EnvoyOptions, fail_open_text, render, template_text

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose" / "envoy.yaml"
CONFIGMAP = ROOT / "deploy" / "kubernetes" / "envoy-configmap.yaml"
CONFIGMAP_KEY = "  envoy.yaml: |\n"


def keep_header(path: Path, marker: str, body: str) -> str:
    """The file's own header (everything before ``marker``) followed by ``body``."""
    text = path.read_text(encoding="utf-8")
    return text[: text.index(marker)] + body


def indented(text: str, prefix: str) -> str:
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(True))


def main() -> None:
    template = template_text()
    (ROOT / "envoy" / "envoy.yaml").write_text(template, encoding="utf-8")
    (ROOT / "envoy" / "envoy-fail-open.yaml").write_text(fail_open_text(template), "utf-8")
    compose = render(EnvoyOptions(upstream_url="http://upstream:8000"))
    COMPOSE.write_text(keep_header(COMPOSE, "\nadmin:", "\n" + compose), encoding="utf-8")
    pod = indented(render(EnvoyOptions(upstream_url="http://llm:8000")), "    ")
    CONFIGMAP.write_text(keep_header(CONFIGMAP, CONFIGMAP_KEY, CONFIGMAP_KEY + pod), "utf-8")


if __name__ == "__main__":
    main()
