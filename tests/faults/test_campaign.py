"""The fault campaign through the real stack (see ``tests.faults.campaign``).

``EXTPROC_CAMPAIGN_SEED`` replays a run; ``EXTPROC_CAMPAIGN_SCALE`` multiplies its request
count (e.g. 4 for a longer run). The totals are printed whether it passes or fails.
"""

from __future__ import annotations

import asyncio
import os
import secrets

import pytest

from tests.faults.campaign import Campaign
from tests.plugins.stack import Stack, StackSettings, free_port

METRICS_PORT = free_port()
STACK = StackSettings(
    proxied=True,
    classify_deadline_ms=1500,
    extra_env=(("EXTPROC_METRICS_LISTEN", f"127.0.0.1:{METRICS_PORT}"),),
)

pytestmark = pytest.mark.e2e


# The campaign resets connections mid-write on purpose: a socket of the test process's own
# fakes or clients that such a reset orphans may reach the garbage collector unclosed. The
# campaign checks the server's descriptors, tasks and connections itself (its invariants).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_fault_campaign(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    stack.require_local()
    seed = int(os.environ.get("EXTPROC_CAMPAIGN_SEED") or secrets.randbelow(2**31))
    scale = float(os.environ.get("EXTPROC_CAMPAIGN_SCALE", "1"))
    campaign = Campaign(
        stack,
        seed,
        f"http://127.0.0.1:{METRICS_PORT}/metrics",
        part_a=int(500 * scale),
        part_b=int(2500 * scale),
        time_limit_s=75.0 * scale,
    )
    report = asyncio.run(campaign.run())
    with capsys.disabled():
        print("\n" + "\n".join(report.lines()))
    assert report.requests >= 1000, "the campaign ran too few requests to mean anything"
    assert not report.violations, "\n".join(report.lines())
