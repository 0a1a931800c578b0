"""The Prometheus alert rules and the Grafana dashboard parse and are well formed.

No promtool wheel exists, so each expression goes through a real PromQL parser (the
``promql-parser`` package) and the rule file's structure is checked as ``promtool check rules``
checks it. That every metric they name is exported is checked against the real server's
endpoint in ``tests/e2e/test_access_log.py``.
"""

from __future__ import annotations

import re
from typing import Any

import promql_parser
import pytest

from tests.deploy.monitoring import dashboard, dashboard_queries, metric_names, parse, rules

RULE_KEYS = {"alert", "expr", "for", "labels", "annotations"}
SEVERITIES = {"warning", "critical"}
ALERTS = [pytest.param(rule, id=rule["alert"]) for rule in rules()]
QUERIES = [pytest.param(q, id=f"query-{i}") for i, q in enumerate(dashboard_queries())]


@pytest.mark.parametrize("rule", ALERTS)
def test_alert_rule_is_well_formed(rule: dict[str, Any]) -> None:
    assert set(rule) == RULE_KEYS
    assert re.fullmatch(r"Extproc[A-Z][A-Za-z]+", rule["alert"])
    assert promql_parser.parse_duration(rule["for"]).total_seconds() > 0
    assert rule["labels"]["severity"] in SEVERITIES
    assert set(rule["annotations"]) == {"summary", "description"}
    tree = parse(rule["expr"])
    assert isinstance(tree, promql_parser.BinaryExpr), "an alert compares against a threshold"
    assert metric_names(tree)


def test_alert_names_are_unique_and_cover_the_failure_modes() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    expressions = " ".join(rule["expr"] for rule in rules())
    for needle in (
        'result="deadline_exceeded"',  # classify deadline misses
        "extproc_commit_results_total",  # commit failures
        "extproc_lookup_duration_seconds_bucket",  # index latency
        'dependency="tokenizer_service"',  # tokenizer outage
        'up{job="extproc"}',  # a worker down
    ):
        assert needle in expressions


@pytest.mark.parametrize("query", QUERIES)
def test_dashboard_query_parses(query: str) -> None:
    assert metric_names(parse(query))


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]

    assert board["uid"] == "extproc-prompt-cache"
    assert len(ids) == len(set(ids))
    for panel in panels:
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "model"}


def test_no_label_carries_a_principal_or_a_key() -> None:
    text = " ".join(dashboard_queries() + [rule["expr"] for rule in rules()])
    for forbidden in ("principal", "tenant", "key", "hash"):
        assert forbidden not in text
