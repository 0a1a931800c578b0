"""Tests for the commit verdict."""

from __future__ import annotations

import dataclasses

import pytest

from extproc.core.verdict import ResponseFacts, Verdict, VetoReason, decide

GOOD = ResponseFacts(status=200, end_of_stream=True, usage_seen=True)

COMMITS = [
    pytest.param(GOOD, id="200-complete-with-usage"),
    pytest.param(dataclasses.replace(GOOD, status=201), id="201"),
    pytest.param(dataclasses.replace(GOOD, status=299), id="299"),
]


@pytest.mark.parametrize("facts", COMMITS)
def test_commit(facts: ResponseFacts) -> None:
    assert decide(facts) == Verdict(commit=True, veto=None)


VETOES = [
    pytest.param({"status": 400}, VetoReason.NON_2XX, id="400"),
    pytest.param({"status": 199}, VetoReason.NON_2XX, id="199"),
    pytest.param({"status": 300}, VetoReason.NON_2XX, id="300"),
    pytest.param({"status": 503, "usage_seen": False}, VetoReason.NON_2XX, id="503-json-error"),
    pytest.param({"end_of_stream": False}, VetoReason.NO_END_OF_STREAM, id="client-disconnect"),
    pytest.param(
        {"end_of_stream": False, "usage_seen": False},
        VetoReason.NO_END_OF_STREAM,
        id="cut-before-usage-blames-the-cut",
    ),
    pytest.param({"error_seen": True}, VetoReason.ERROR_FRAME, id="mid-stream-error"),
    pytest.param(
        {"error_seen": True, "usage_seen": False},
        VetoReason.ERROR_FRAME,
        id="error-instead-of-usage",
    ),
    pytest.param({"oversized": True}, VetoReason.OVERSIZED_EVENT, id="oversized-event"),
    pytest.param(
        {"oversized": True, "usage_seen": False},
        VetoReason.OVERSIZED_EVENT,
        id="oversized-hid-the-usage",
    ),
    pytest.param({"usage_seen": False}, VetoReason.NO_USAGE, id="no-usage"),
]


@pytest.mark.parametrize(("changes", "veto"), VETOES)
def test_veto(changes: dict[str, object], veto: VetoReason) -> None:
    facts = dataclasses.replace(GOOD, **changes)
    assert decide(facts) == Verdict(commit=False, veto=veto)


def test_veto_labels_are_distinct_snake_case() -> None:
    labels = [reason.value for reason in VetoReason]
    assert len(set(labels)) == len(labels)
    assert all(label == label.lower() and " " not in label for label in labels)
