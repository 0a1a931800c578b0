"""The tokenizer service client against the fake service: memo, breaker, every failure mapped."""

from __future__ import annotations

import asyncio
import random
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from extproc.adapters.breaker import Breaker, BreakerPolicy, BreakerState, CircuitOpen
from extproc.adapters.tokenizers_remote import (
    BACKOFF_MAX_S,
    RemoteTimeouts,
    RemoteTokenizer,
    RetryBudget,
    backoff,
)
from extproc.core.errors import DependencyError, UnmappedModel
from extproc.core.model import TokenCounts
from tests.fakes.tokenizer_service import Faults

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(tokenizer_service, clock) -> AsyncIterator[RemoteTokenizer]:
    timeouts = RemoteTimeouts(connect=0.5, total=0.5, models_ttl=60.0)
    remote = RemoteTokenizer(tokenizer_service.url + "/", timeouts, clock=clock)
    yield remote
    await remote.aclose()


async def test_version_from_the_model_list(client, tokenizer_service, tokenizer_alias):
    assert await client.version(tokenizer_alias) == tokenizer_service.version(tokenizer_alias)
    assert await client.version("unknown") is None


async def test_model_list_is_memoised_for_its_ttl(
    client, tokenizer_service, tokenizer_alias, clock
):
    for _ in range(3):
        await client.version(tokenizer_alias)
    clock.now += 59.9
    await client.version(tokenizer_alias)
    assert tokenizer_service.requests["/v1/models"] == 1
    clock.now += 0.1
    await client.version(tokenizer_alias)  # served the last list, refreshed in the background
    await client.settle()
    assert tokenizer_service.requests["/v1/models"] == 2
    await client.version(tokenizer_alias)
    assert tokenizer_service.requests["/v1/models"] == 2


async def test_outage_is_not_memoised(client, tokenizer_service, tokenizer_alias):
    tokenizer_service.faults = Faults(status=500)
    with pytest.raises(DependencyError, match="status 500"):
        await client.version(tokenizer_alias)
    tokenizer_service.faults = Faults()
    assert await client.version(tokenizer_alias) == tokenizer_service.version(tokenizer_alias)
    assert tokenizer_service.requests["/v1/models"] == 2


async def test_count_returns_real_counts(
    client, tokenizer_service, tokenizer_alias, embedded_tokenizer
):
    segments = ["You are terse.", "", "Grüße 東京 🚀", "def f():\n    pass\n"]
    counts = await client.count(tokenizer_alias, segments)
    assert counts == await embedded_tokenizer.count(tokenizer_alias, segments)
    assert counts.tokenizer_version == tokenizer_service.version(tokenizer_alias)


async def test_unmapped_model_is_422(client):
    with pytest.raises(UnmappedModel):
        await client.count("unknown", ["x"])


FAULTS = [
    pytest.param(Faults(delay=5.0), "timed out", id="slower-than-timeout"),
    pytest.param(Faults(status=500), "status 500", id="status-500"),
    pytest.param(Faults(status=404), "status 404", id="status-404"),
    pytest.param(Faults(malformed=True), "malformed JSON", id="malformed-json"),
    pytest.param(Faults(reset=True), "tokenize: connection lost", id="reset"),
    pytest.param(Faults(wrong_counts=True), "counts for 2 segments", id="count-mismatch"),
]


@pytest.mark.parametrize(("faults", "message"), FAULTS)
async def test_count_failures_are_dependency_errors(
    client, tokenizer_service, tokenizer_alias, faults, message
):
    tokenizer_service.faults = faults
    with pytest.raises(DependencyError, match=message) as caught:
        await client.count(tokenizer_alias, ["a", "b"])
    assert not isinstance(caught.value, UnmappedModel)
    tokenizer_service.faults = Faults()
    assert (await client.count(tokenizer_alias, ["a", "b"])).segment_counts == (1, 1)


@pytest.mark.parametrize(("faults", "message"), FAULTS[:5])
async def test_model_list_failures_are_dependency_errors(
    client, tokenizer_service, tokenizer_alias, faults, message
):
    tokenizer_service.faults = faults
    with pytest.raises(DependencyError, match=message.replace("tokenize", "models")):
        await client.version(tokenizer_alias)


async def test_nothing_listening_is_a_dependency_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    remote = RemoteTokenizer(f"http://127.0.0.1:{port}", RemoteTimeouts(connect=0.5, total=0.5))
    with pytest.raises(DependencyError, match="cannot connect"):
        await remote.count("m", ["x"])
    with pytest.raises(DependencyError, match="cannot connect"):
        await remote.version("m")
    await remote.aclose()


BAD_ANSWERS = [
    pytest.param([], "not an object", id="not-object"),
    pytest.param({"segment_counts": [1]}, "no tokenizer_version", id="no-version"),
    pytest.param({"tokenizer_version": "v", "segment_counts": [-1]}, "non-negative", id="negative"),
    pytest.param({"tokenizer_version": "v", "segment_counts": [1.5]}, "non-negative", id="float"),
    pytest.param({"tokenizer_version": "v", "segment_counts": [True]}, "non-negative", id="bool"),
    pytest.param({"tokenizer_version": "v", "segment_counts": "1"}, "non-negative", id="not-list"),
    pytest.param({"tokenizer_version": "v", "segment_counts": [1, 2]}, "2 counts", id="too-many"),
    pytest.param(
        {"tokenizer_version": "v", "segment_counts": [1], "virtual_model": "other"},
        "another model",
        id="other-model",
    ),
    pytest.param(
        {"tokenizer_version": "v", "segment_counts": [1], "cumulative": [2]},
        "cumulative",
        id="cumulative-mismatch",
    ),
    pytest.param(
        {"tokenizer_version": "v", "segment_counts": [1], "total": 3}, "total", id="total-mismatch"
    ),
]


@pytest.mark.parametrize(("answer", "message"), BAD_ANSWERS)
def test_bad_tokenize_answers_are_rejected(answer, message):
    from extproc.adapters.tokenizers_remote import _parse_counts

    with pytest.raises(DependencyError, match=message):
        _parse_counts(answer, "m", 1)


def test_minimal_tokenize_answer_is_accepted():
    from extproc.adapters.tokenizers_remote import _parse_counts

    answer = {"tokenizer_version": "v", "segment_counts": [0]}
    assert _parse_counts(answer, "m", 1) == TokenCounts("v", (0,))


BAD_MODEL_LISTS = [
    pytest.param({}, id="no-models"),
    pytest.param({"models": {}}, id="models-not-list"),
    pytest.param({"models": [{"alias": "m"}]}, id="no-version"),
    pytest.param({"models": [{"alias": "", "tokenizer_version": "v"}]}, id="empty-alias"),
    pytest.param({"models": ["m"]}, id="entry-not-object"),
]


@pytest.mark.parametrize("answer", BAD_MODEL_LISTS)
def test_bad_model_lists_are_rejected(answer):
    from extproc.adapters.tokenizers_remote import _parse_models

    with pytest.raises(DependencyError, match="/v1/models"):
        _parse_models(answer)


async def test_fake_service_runs_as_a_process(tokenizer_file, tokenizer_alias):
    """End-to-end tests start the fake as a separate process; it must announce its address."""
    command = [sys.executable, "-m", "tests.fakes.tokenizer_service", "--port", "0"]
    command += ["--model", f"{tokenizer_alias}={tokenizer_file}"]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
        assert line.startswith("listening on http://127.0.0.1:"), line
        remote = RemoteTokenizer(line.split()[-1], RemoteTimeouts(connect=5, total=30))
        counts = await remote.count(tokenizer_alias, ["hello world"])
        await remote.aclose()
        assert counts.segment_counts == (2,)
    finally:
        process.terminate()
        _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


async def test_closed_client_degrades(client, tokenizer_alias):
    await client.aclose()
    with pytest.raises(DependencyError, match="closed"):
        await client.count(tokenizer_alias, ["x"])


# ---- 503: retried with backoff, within a shared budget and the classify deadline ----


@pytest.fixture
async def real_clock_client(tokenizer_service) -> AsyncIterator[RemoteTokenizer]:
    timeouts = RemoteTimeouts(connect=0.5, total=0.5, retry_window=1.5)
    remote = RemoteTokenizer(tokenizer_service.url, timeouts, rng=random.Random(7))
    yield remote
    await remote.aclose()


async def test_a_503_is_retried_until_the_service_answers(
    real_clock_client, tokenizer_service, tokenizer_alias, embedded_tokenizer
):
    tokenizer_service.faults = Faults(status=503, status_times=2)
    counts = await real_clock_client.count(tokenizer_alias, ["hello world"])
    assert counts == await embedded_tokenizer.count(tokenizer_alias, ["hello world"])
    assert tokenizer_service.requests["/v1/tokenize"] == 3
    assert real_clock_client.retries == 2


async def test_a_lasting_503_gives_up_inside_the_retry_window(
    tokenizer_service, tokenizer_alias, clock
):
    """The backoff schedule, on a clock that the client's own sleeps move forward."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    timeouts = RemoteTimeouts(connect=0.5, total=0.5, retry_window=1.5)
    remote = RemoteTokenizer(
        tokenizer_service.url, timeouts, clock=clock, rng=random.Random(7), sleep=sleep
    )
    tokenizer_service.faults = Faults(status=503)
    try:
        with pytest.raises(DependencyError, match="status 503"):
            await remote.count(tokenizer_alias, ["x"])
    finally:
        await remote.aclose()
    assert remote.retries == len(slept) >= 2
    same = random.Random(7)
    schedule = [backoff(attempt, same) for attempt in range(len(slept) + 1)]
    assert slept == schedule[:-1]  # doubling from 100 ms, jittered
    assert sum(slept) < timeouts.retry_window  # every retry ended inside the window
    assert sum(slept) + schedule[-1] >= timeouts.retry_window  # the next would not have
    assert tokenizer_service.requests["/v1/tokenize"] == len(slept) + 1


@pytest.mark.parametrize("status", [pytest.param(500, id="500"), pytest.param(429, id="429")])
async def test_other_statuses_are_not_retried(
    real_clock_client, tokenizer_service, tokenizer_alias, status
):
    tokenizer_service.faults = Faults(status=status)
    with pytest.raises(DependencyError, match=f"status {status}"):
        await real_clock_client.count(tokenizer_alias, ["x"])
    assert tokenizer_service.requests["/v1/tokenize"] == 1
    assert real_clock_client.retries == 0


async def test_the_retry_budget_is_shared_by_every_call(tokenizer_service, tokenizer_alias, clock):
    """The clock stands still: the budget never refills, so ten retries in all, not per call."""
    timeouts = RemoteTimeouts(connect=0.5, total=0.5, retry_window=60.0)
    remote = RemoteTokenizer(tokenizer_service.url, timeouts, clock=clock, rng=random.Random(1))
    tokenizer_service.faults = Faults(status=503)
    try:
        calls = [remote.count(tokenizer_alias, ["x"]) for _ in range(4)]
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await remote.aclose()
    assert all(isinstance(r, DependencyError) for r in results)
    assert remote.retries == 10
    assert tokenizer_service.requests["/v1/tokenize"] == 4 + 10


BACKOFFS = [
    pytest.param(0, 0.05, 0.1, id="first"),
    pytest.param(1, 0.1, 0.2, id="second"),
    pytest.param(3, 0.4, 0.8, id="fourth"),
    pytest.param(5, BACKOFF_MAX_S / 2, BACKOFF_MAX_S, id="capped"),
    pytest.param(60, BACKOFF_MAX_S / 2, BACKOFF_MAX_S, id="far-past-the-cap"),
]


@pytest.mark.parametrize(("attempt", "low", "high"), BACKOFFS)
def test_backoff_doubles_from_100ms_to_2s_with_jitter(attempt: int, low: float, high: float):
    rng = random.Random(3)
    delays = [backoff(attempt, rng) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    assert max(delays) - min(delays) > (high - low) / 4  # jittered, not constant


def test_the_budget_refills_at_its_rate(clock):
    budget = RetryBudget(rate=10.0, clock=clock)
    assert sum(budget.take() for _ in range(15)) == 10
    clock.now += 0.25
    assert sum(budget.take() for _ in range(5)) == 2
    clock.now += 60
    assert sum(budget.take() for _ in range(15)) == 10


# ---- no herds: one model-list fetch at a time, the last good list while refreshing ----


async def test_concurrent_callers_share_one_model_list_fetch(
    client, tokenizer_service, tokenizer_alias
):
    tokenizer_service.faults = Faults(status=500)
    results = await asyncio.gather(
        *(client.version(tokenizer_alias) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, DependencyError) for r in results)
    assert tokenizer_service.requests["/v1/models"] == 1
    tokenizer_service.faults = Faults()
    versions = await asyncio.gather(*(client.version(tokenizer_alias) for _ in range(5)))
    assert versions == [tokenizer_service.version(tokenizer_alias)] * 5
    assert tokenizer_service.requests["/v1/models"] == 2


async def test_the_last_good_list_is_served_while_the_service_is_slow(
    client, tokenizer_service, tokenizer_alias, clock
):
    version = await client.version(tokenizer_alias)
    tokenizer_service.faults = Faults(delay=5.0)  # far past the 0.5 s call timeout
    clock.now += 60.0
    answers = await asyncio.gather(*(client.version(tokenizer_alias) for _ in range(5)))
    assert answers == [version] * 5  # at once, while one refresh waits for the service
    await client.settle()
    assert tokenizer_service.requests["/v1/models"] == 2
    clock.now += 60.0  # past the stale bound (60 s by default): the list is gone
    with pytest.raises(DependencyError, match="timed out"):
        await client.version(tokenizer_alias)


async def test_calls_go_through_the_breaker(tokenizer_service, tokenizer_alias, clock):
    breaker = Breaker("tokenizer_service", BreakerPolicy(failures=2, cooldown_s=5.0), clock)
    timeouts = RemoteTimeouts(connect=0.5, total=0.5)
    remote = RemoteTokenizer(tokenizer_service.url, timeouts, clock=clock, breaker=breaker)
    try:
        await remote.version(tokenizer_alias)
        tokenizer_service.faults = Faults(delay=5.0)
        for _ in range(2):
            with pytest.raises(DependencyError, match="timed out"):
                await remote.count(tokenizer_alias, ["x"])
        with pytest.raises(CircuitOpen):
            await remote.count(tokenizer_alias, ["x"])
        assert tokenizer_service.requests["/v1/tokenize"] == 2
        tokenizer_service.faults = Faults()
        clock.now += 5.0
        assert (await remote.count(tokenizer_alias, ["hello world"])).segment_counts == (2,)
        assert breaker.state is BreakerState.CLOSED
    finally:
        await remote.aclose()


async def test_an_unmapped_model_does_not_open_the_breaker(tokenizer_service, clock):
    breaker = Breaker("tokenizer_service", BreakerPolicy(failures=1, cooldown_s=5.0), clock)
    remote = RemoteTokenizer(tokenizer_service.url, RemoteTimeouts(), clock=clock, breaker=breaker)
    try:
        for _ in range(3):
            with pytest.raises(UnmappedModel):
                await remote.count("unknown", ["x"])
        assert breaker.state is BreakerState.CLOSED
    finally:
        await remote.aclose()
