"""The Tokenizer port over HTTP: a client for the tokenizer service (models and tokenize).

Rules:
* one pool of keep-alive connections (``http1.Http1Client``, the cheapest client measured in
  ``benchmarks/bench_http_clients.py``), connected on first use;
* the model list is memoised for ``models_ttl``; past it the last good list is still served,
  for ``models_stale_for`` more seconds, while one fetch refreshes it; concurrent callers with
  no list share one fetch; a failed fetch is not memoised;
* a ``503`` (the service is starting, or shedding load) is retried with jittered exponential
  backoff (100 ms growing to 2 s) while a retry budget shared by every call has tokens (about
  ten retries a second) and the retry still ends inside ``retry_window`` (the classify
  deadline);
* calls go through the service's breaker, when there is one;
* every transport failure, timeout, unexpected status or malformed answer becomes
  ``DependencyError`` here, in one place; ``422`` from ``/v1/tokenize`` is ``UnmappedModel``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.adapters import http1
from extproc.adapters.breaker import Breaker, through
from extproc.adapters.memo import TtlMemo
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
    models_stale_for: float = 60.0


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


_MODELS = "models"


class RemoteTokenizer:
    """Counts tokens by asking the tokenizer service at ``base_url``; one shared HTTP session."""

    def __init__(
        self,
        base_url: str,
        timeouts: RemoteTimeouts | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        breaker: Breaker | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._timeouts = timeouts or RemoteTimeouts()
        t = self._timeouts
        self._http = http1.Http1Client(base_url, connect=t.connect, total=t.total, headers=_JSON)
        self._clock = clock
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._budget = RetryBudget(clock=clock)
        self._breaker = breaker
        self.retries = 0
        self._models: TtlMemo[str, Mapping[str, str]] = TtlMemo(
            t.models_ttl, 1, clock, t.models_stale_for
        )

    async def version(self, alias: str) -> str | None:
        return (await self.models()).get(alias)

    async def models(self) -> Mapping[str, str]:
        """Alias to tokenizer version (see the module rules for memo, staleness, sharing)."""
        return await self._models.resolve(_MODELS, self._fetch_models)

    async def count(self, alias: str, segments: Sequence[str]) -> TokenCounts:
        request = codec.dumps({"virtual_model": alias, "segments": list(segments)})
        body = await through(self._breaker, lambda: self._call("POST", "/v1/tokenize", request))
        return _parse_counts(body, alias, len(segments))

    async def settle(self) -> None:
        """Wait for a background refresh of the model list, if one is under way."""
        await self._models.settle()

    async def aclose(self) -> None:
        await self._models.settle()
        await self._http.aclose()

    async def _fetch_models(self) -> Mapping[str, str]:
        body = await through(self._breaker, lambda: self._call("GET", "/v1/models", None))
        return _parse_models(body)

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
            await self._sleep(delay)

    async def _call_once(self, method: str, path: str, content: bytes | None) -> Any:
        """The parsed JSON answer of one call; every way it can fail is mapped here."""
        try:
            status, body = await self._http.request(method, path, content)
        except http1.HttpError as exc:
            raise DependencyError(f"tokenizer service {path}: {exc.reason}") from exc
        if status == 422 and path == "/v1/tokenize":
            raise UnmappedModel(f"tokenizer service does not map this model ({path})")
        if status == 503:
            raise _Unavailable(f"tokenizer service {path}: status 503")
        if status != 200:
            raise DependencyError(f"tokenizer service {path}: status {status}")
        try:
            return codec.loads(body)
        except codec.JSONDecodeError as exc:
            raise DependencyError(f"tokenizer service {path}: malformed JSON") from exc


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
