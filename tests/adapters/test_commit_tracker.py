"""The commit tracker: commits run as tracked tasks, and one that would write nothing is not run."""

from __future__ import annotations

from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc.adapters.servicer import CommitTracker
from extproc.adapters.telemetry import METER_NAME, Metrics, meter_provider
from extproc.core.model import (
    CacheEntry,
    IndexHit,
    PendingWrite,
    PrefixHash,
    PrincipalId,
    Scope,
    Tier,
)
from tests.adapters.test_telemetry import collected
from tests.fakes.ports import FakeIndex

SCOPE = Scope(PrincipalId("tenant"), "m", "v1")
HIT = IndexHit(PrefixHash(b"\x01" * 32), 100, Tier.M5)


class NothingDue(FakeIndex):
    """An index whose refreshes are all debounced."""

    def due(self, pending: PendingWrite) -> bool:
        return bool(pending.entries)


def tracker(index: FakeIndex) -> tuple[CommitTracker, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    metrics = Metrics(meter_provider((reader,)).get_meter(METER_NAME))
    return CommitTracker(index, 10.0, metrics), reader


async def test_a_commit_that_is_not_due_starts_no_task() -> None:
    index = NothingDue()
    commits, reader = tracker(index)
    commits.schedule(PendingWrite(SCOPE, (), HIT))
    assert commits.pending == 0
    assert await commits.drain(1) == 0
    assert index.commits == []
    assert collected(reader, "extproc.commit_results") == {(("result", "not_due"),): 1}


async def test_a_due_commit_runs_in_a_tracked_task() -> None:
    index = NothingDue()
    commits, reader = tracker(index)
    commits.schedule(PendingWrite(SCOPE, (CacheEntry(HIT.prefix_hash, 100, Tier.M5),), None))
    assert commits.pending == 1
    assert await commits.drain(10) == 0
    assert len(index.commits) == 1
    assert collected(reader, "extproc.commit_results") == {(("result", "ok"),): 1}
