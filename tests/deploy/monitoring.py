"""The shipped Grafana dashboard and Prometheus rules: their PromQL and the metrics it names."""

from __future__ import annotations

import json
from typing import Any

import promql_parser
import yaml

from tests.deploy.manifests import ROOT

DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"
RULES = ROOT / "deploy" / "monitoring" / "prometheus-rules.yaml"
# Series Prometheus makes itself, not the server.
SCRAPE_SERIES = frozenset({"up"})
# Grafana variables, replaced by values that parse the way Grafana's substitution does.
_VARIABLES = {"$__rate_interval": "5m", "$model": ".*"}


def dashboard() -> dict[str, Any]:
    found: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return found


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    found = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            found.append(variable["definition"])
    return found


def parse(expr: str) -> Any:
    """The PromQL syntax tree of ``expr`` (Grafana variables substituted)."""
    for variable, value in _VARIABLES.items():
        expr = expr.replace(variable, value)
    if expr.startswith("label_values("):  # Grafana's own function: its first argument
        expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
    return promql_parser.parse(expr)


def metric_names(node: Any) -> set[str]:
    """Every metric name a PromQL syntax tree selects."""
    if isinstance(node, promql_parser.VectorSelector):
        return {node.name} if node.name else set()
    if isinstance(node, promql_parser.MatrixSelector):
        return metric_names(node.vector_selector)
    if isinstance(node, promql_parser.Call):
        return set().union(*(metric_names(a) for a in node.args))
    if isinstance(node, promql_parser.AggregateExpr):
        return metric_names(node.expr) | (metric_names(node.param) if node.param else set())
    if isinstance(node, promql_parser.BinaryExpr):
        return metric_names(node.lhs) | metric_names(node.rhs)
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr):
        return metric_names(node.expr)
    if isinstance(node, promql_parser.SubqueryExpr):
        return metric_names(node.expr)
    return set()


def names_used() -> set[str]:
    """The metric names the dashboard and the rules query (Prometheus' own left out)."""
    exprs = dashboard_queries() + [rule["expr"] for rule in rules()]
    return set().union(*(metric_names(parse(e)) for e in exprs)) - SCRAPE_SERIES
