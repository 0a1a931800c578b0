"""The Tokenizer port over HTTP: a client for the tokenizer service (models and tokenize).

The model list is memoised for a while; a failed fetch is not, so the next call retries. A
``503`` (the service is starting, or shedding load) is retried with jittered exponential
backoff (100 ms growing to 2 s) while a retry budget shared by every call has tokens (about
ten retries a second) and the retry still ends inside ``retry_window`` (the classify deadline).
Every transport failure, timeout, unexpected status or malformed answer becomes
``DependencyError`` here, in one place; ``422`` from ``/v1/tokenize`` is ``UnmappedModel``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from extproc.core import codec
from extproc.core.errors import DependencyError, UnmappedModel
from extproc.core.model import TokenCounts

_JSON = {"content-type": "application/json", "accept": "application/json"}


@dataclass(frozen=True, slots=True)
class RemoteTimeouts:
    """Seconds allowed to connect, and for a whole call; how long the model list is kept."""

    connect: float = 1.0
    total: float = 1.0
    models_ttl: float = 60.0
    retry_window: float = 5.0


BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
RETRIES_PER_S = 10.0


class RetryBudget:
    """A token bucket of retries shared by every call: ``rate`` a second, ``rate`` at most."""

    def __init__(self, rate: float = RETRIES_PER_S, clock: Callable[[], float] = time.monotonic):
        self._rate = rate
        self._clock = clock
        self._tokens = rate
        self._at = clock()

    def take(self) -> bool:
        """Spend one retry if there is one."""
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def backoff(attempt: int, rng: random.Random) -> float:
    """Seconds before retry ``attempt`` (0-based): doubling from 100 ms to 2 s, jittered."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * float(2 ** min(attempt, 16)))
    return ceiling * rng.uniform(0.5, 1.0)


class _Unavailable(DependencyError):
    """The service answered 503."""


@dataclass(frozen=True, slots=True)
class _Models:
    versions: Mapping[str, str]
    fetched_at: float


class RemoteTokenizer:
    """Counts tokens by asking the tokenizer service at ``base_url``; one shared HTTP client."""

    def __init__(
        self,
        base_url: str,
        timeouts: RemoteTimeouts | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._timeouts = timeouts or RemoteTimeouts()
        self._clock = clock
        self._rng = rng or random.Random()
        self._budget = RetryBudget(clock=clock)
        self.retries = 0
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(self._timeouts.total, connect=self._timeouts.connect),
            headers=_JSON,
        )
        self._models: _Models | None = None
        self._fetching = asyncio.Lock()

    async def version(self, alias: str) -> str | None:
        return (await self.models()).get(alias)

    async def models(self) -> Mapping[str, str]:
        """Alias to tokenizer version, fetched at most once per TTL while fetches succeed."""
        async with self._fetching:
            if self._models is None or self._is_stale(self._models):
                body = await self._call("GET", "/v1/models", None)
                self._models = _Models(_parse_models(body), self._clock())
            return self._models.versions

    async def count(self, alias: str, segments: Sequence[str]) -> TokenCounts:
        request = {"virtual_model": alias, "segments": list(segments)}
        body = await self._call("POST", "/v1/tokenize", codec.dumps(request))
        return _parse_counts(body, alias, len(segments))

    async def aclose(self) -> None:
        await self._client.aclose()

    def _is_stale(self, models: _Models) -> bool:
        return self._clock() - models.fetched_at >= self._timeouts.models_ttl

    async def _call(self, method: str, path: str, content: bytes | None) -> Any:
        """The parsed JSON answer, retrying a 503 while the budget and the window allow."""
        started = self._clock()
        attempt = 0
        while True:
            try:
                return await self._call_once(method, path, content)
            except _Unavailable:
                delay = backoff(attempt, self._rng)
                if self._clock() - started + delay >= self._timeouts.retry_window:
                    raise
                if not self._budget.take():
                    raise
            self.retries += 1
            attempt += 1
            await asyncio.sleep(delay)

    async def _call_once(self, method: str, path: str, content: bytes | None) -> Any:
        """The parsed JSON answer of one call; every way it can fail is mapped here."""
        try:
            async with asyncio.timeout(self._timeouts.total):
                response = await self._client.request(method, path, content=content)
        except (httpx.HTTPError, TimeoutError, RuntimeError) as exc:  # RuntimeError: closed
            raise DependencyError(f"tokenizer service {path}: {_describe(exc)}") from exc
        if response.status_code == 422 and path == "/v1/tokenize":
            raise UnmappedModel(f"tokenizer service does not map this model ({path})")
        if response.status_code == 503:
            raise _Unavailable(f"tokenizer service {path}: status 503")
        if response.status_code != 200:
            raise DependencyError(f"tokenizer service {path}: status {response.status_code}")
        try:
            return codec.loads(response.content)
        except codec.JSONDecodeError as exc:
            raise DependencyError(f"tokenizer service {path}: malformed JSON") from exc


def _describe(exc: Exception) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timed out"
    return type(exc).__name__


def _parse_models(body: Any) -> dict[str, str]:
    entries = body.get("models") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        raise DependencyError("tokenizer service /v1/models: no models list")
    versions = {}
    for entry in entries:
        alias = entry.get("alias") if isinstance(entry, dict) else None
        version = entry.get("tokenizer_version") if isinstance(entry, dict) else None
        if not (isinstance(alias, str) and isinstance(version, str) and alias and version):
            raise DependencyError("tokenizer service /v1/models: malformed model entry")
        versions[alias] = version
    return versions


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_counts(body: Any, alias: str, expected: int) -> TokenCounts:
    """Counts from a tokenize answer, checked against the request and against themselves."""
    if not isinstance(body, dict):
        raise _bad_answer("answer is not an object")
    version, counts = body.get("tokenizer_version"), body.get("segment_counts")
    if not isinstance(version, str) or not version:
        raise _bad_answer("no tokenizer_version")
    if not isinstance(counts, list) or not all(_is_count(c) for c in counts):
        raise _bad_answer("segment_counts are not non-negative integers")
    if body.get("virtual_model", alias) != alias:
        raise _bad_answer("answer is for another model")
    if len(counts) != expected:
        raise _bad_answer(f"{len(counts)} counts for {expected} segments")
    problem = _totals_problem(body, counts)
    if problem:
        raise _bad_answer(problem)
    return TokenCounts(version, tuple(counts))


def _bad_answer(problem: str) -> DependencyError:
    return DependencyError(f"tokenizer service /v1/tokenize: {problem}")


def _totals_problem(body: Mapping[str, Any], counts: list[int]) -> str:
    """``cumulative`` and ``total``, when present, must agree with the segment counts."""
    running, cumulative = 0, []
    for c in counts:
        running += c
        cumulative.append(running)
    if "cumulative" in body and body["cumulative"] != cumulative:
        return "cumulative does not match segment_counts"
    if "total" in body and body["total"] != running:
        return "total does not match segment_counts"
    return ""
