"""The accounting record built from a settled response (DESIGN §13)."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.core import record
from extproc.core.dialects import chat, messages, responses
from extproc.core.model import (
    CacheEntry,
    Classification,
    IndexHit,
    Outcome,
    PendingWrite,
    PrefixHash,
    PrincipalId,
    Scope,
    Split,
    Tier,
)
from extproc.core.phases import Settled, Unwatched, UsageSent
from extproc.core.verdict import COMMIT, Verdict, VetoReason
from tests.plugins.records import RECORD_FIELDS

DIALECTS = {d.name: d for d in (chat.DIALECT, messages.DIALECT, responses.DIALECT)}

TENANT = PrincipalId("tenant-a")
SCOPE = Scope(TENANT, "demo", "v1")
HASH = PrefixHash(b"\x01" * 32)
WRITE = PendingWrite(SCOPE, (CacheEntry(HASH, 120, Tier.H1),), None)
REFRESH = PendingWrite(SCOPE, (), IndexHit(HASH, 120, Tier.H1))
CREATED = Classification(
    Outcome.CREATE_ONLY,
    Split(creation={Tier.M5: 20, Tier.H1: 100}),
    WRITE,
    model="demo",
    principal=TENANT,
)
READ = Classification(Outcome.READ, Split(read=120), REFRESH, model="demo", principal=TENANT)
USAGE = {"prompt_tokens": 1000, "completion_tokens": 7}


def _settled(
    classification: Classification | None,
    usage: dict[str, Any] | None = USAGE,
    verdict: Verdict = COMMIT,
) -> Settled:
    pending = classification.pending if classification is not None and verdict.commit else None
    return Settled(verdict, pending, True, classification, usage)


def _cached(tokens: int) -> dict[str, Any]:
    return {"prompt_tokens_details": {"cached_tokens": tokens}}


CASES = [
    pytest.param(
        _settled(CREATED),
        {"outcome": "create_only", "read": 0, "creation_5m": 20, "creation_1h": 100},
        {"commit": "scheduled", "read_source": "index", "principal": "tenant-a"},
        id="write",
    ),
    pytest.param(
        _settled(READ),
        {"outcome": "read", "read": 120, "creation_5m": 0, "creation_1h": 0},
        {"commit": "scheduled", "prompt_tokens": 1000},
        id="read-refreshes",
    ),
    pytest.param(
        _settled(READ, {"prompt_tokens": 50}),
        {"read": 50, "prompt_tokens": 50},
        {"commit": "scheduled"},
        id="read-capped-by-prompt",
    ),
    pytest.param(
        _settled(CREATED, {"prompt_tokens": 100}),
        {"read": 0, "creation_5m": 0, "creation_1h": 0},
        {"outcome": "create_only"},
        id="creation-above-prompt-reports-zeros",
    ),
    pytest.param(
        _settled(CREATED, None, Verdict(False, VetoReason.NO_USAGE)),
        {"creation_1h": 100, "prompt_tokens": None},
        {"commit": "no_usage"},
        id="no-usage-veto",
    ),
    pytest.param(
        _settled(CREATED, USAGE, Verdict(False, VetoReason.ERROR_FRAME)),
        {"outcome": "create_only"},
        {"commit": "error_frame"},
        id="error-frame-veto",
    ),
    pytest.param(
        _settled(Classification.zero("no_markers", "demo", TENANT)),
        {"outcome": "zero_active", "reason": "no_markers", "read": 0},
        {"commit": "none", "read_source": "index", "model": "demo"},
        id="zero-active",
    ),
    pytest.param(
        _settled(Classification.engine_read("demo"), {"prompt_tokens": 90, **_cached(40)}),
        {"read": 40, "read_source": "engine"},
        {"outcome": "zero_active", "reason": "engine_cache", "commit": "none"},
        id="engine-read",
    ),
    pytest.param(
        _settled(Classification.inactive("unknown_principal")),
        {"outcome": "inactive", "reason": "unknown_principal", "read": 0},
        {"principal": None, "model": None, "read_source": "none", "commit": "none"},
        id="inactive",
    ),
    pytest.param(
        _settled(None, None, Verdict(False, VetoReason.NON_2XX)),
        {"outcome": "inactive", "reason": "not_joined"},
        {"commit": "non_2xx"},
        id="non-2xx-before-classification",
    ),
]


@pytest.mark.parametrize(("settled", "counts", "labels"), CASES)
def test_settled_record(settled: Settled, counts: dict[str, Any], labels: dict[str, Any]) -> None:
    fields = record.of_settled(settled, chat.DIALECT).fields()

    assert set(fields) == RECORD_FIELDS
    assert fields["route"] == "chat_completions"
    assert {k: fields[k] for k in counts} == counts
    assert {k: fields[k] for k in labels} == labels


@pytest.mark.parametrize(
    ("classification", "commit", "reason"),
    [
        pytest.param(CREATED, "unwatched", "", id="write-lost"),
        pytest.param(Classification.inactive("no_bearer"), "none", "no_bearer", id="inactive"),
        pytest.param(None, "none", "not_joined", id="not-known-yet"),
    ],
)
def test_unwatched_record(classification: Classification | None, commit: str, reason: str) -> None:
    fallback = Classification.inactive("not_joined")
    fields = record.of_unwatched(Unwatched(classification), fallback, chat.DIALECT).fields()

    assert (fields["commit"], fields["reason"], fields["prompt_tokens"]) == (commit, reason, None)


def test_a_stream_whose_usage_went_out_is_not_committed_until_its_end() -> None:
    fields = record.of_usage_sent(UsageSent(CREATED, USAGE), chat.DIALECT).fields()

    assert (fields["outcome"], fields["commit"]) == ("create_only", "no_end_of_stream")
    assert (fields["creation_1h"], fields["prompt_tokens"]) == (100, 1000)


ROUTE_CASES = [
    pytest.param("chat", {"prompt_tokens": 50}, 50, 50, id="chat"),
    pytest.param(
        "messages",
        {"input_tokens": 10, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 20},
        60,
        60,
        id="messages-sums-its-three-input-counts",
    ),
    pytest.param("messages", {"input_tokens": 40}, 40, 40, id="messages-input-only"),
    pytest.param("messages", {"input_tokens": None}, None, 120, id="messages-no-count-no-cap"),
    pytest.param("responses", {"input_tokens": 70, "prompt_tokens": 5}, 70, 70, id="responses"),
]


@pytest.mark.parametrize(("dialect", "usage", "prompt", "read"), ROUTE_CASES)
def test_each_route_counts_the_prompt_as_its_api_does(
    dialect: str, usage: dict[str, Any], prompt: int | None, read: int
) -> None:
    found = record.of_settled(_settled(READ, usage), DIALECTS[dialect]).fields()
    assert (found["prompt_tokens"], found["read"]) == (prompt, read)
    assert found["route"] == {"chat": "chat_completions"}.get(dialect, dialect)


@pytest.mark.parametrize(
    ("dialect", "usage"),
    [
        pytest.param(
            "messages", {"input_tokens": 90, "cache_read_input_tokens": 40}, id="messages"
        ),
        pytest.param(
            "responses",
            {"input_tokens": 90, "input_tokens_details": {"cached_tokens": 40}},
            id="responses",
        ),
    ],
)
def test_an_engine_read_is_taken_where_each_api_reports_it(
    dialect: str, usage: dict[str, Any]
) -> None:
    engine = Classification.engine_read("demo")
    found = record.of_settled(_settled(engine, usage), DIALECTS[dialect]).fields()
    assert (found["read"], found["read_source"]) == (40, "engine")
