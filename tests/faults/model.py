"""The fault-free model of the campaign's requests: what each one may report and commit.

Every planned request is built from a few shared texts (system prompts and documents, the same
for every tenant, so a tenant reading another's entries would show) and, for writes, a block of
its own. With markers it has breakpoints at the system prompt (1h), the document (5m) and its
own block (5m); the fault-free server reports for it one of three splits, by how deep the index
already held the prefix when it was classified (nothing, the system prompt, or the document).
Which of those are legitimate depends on what other requests of the same tenant committed
before it ended; ``Model`` decides that after the run, from what the requests' outcomes allow.

Degraded values (DESIGN §3.1): ``INACTIVE`` (no cache fields at all) and ``ZERO`` (all zero).
"""

from __future__ import annotations

import enum
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from extproc.core import codec
from extproc.core.model import RequestPolicy, Tier, TierPolicy
from extproc.core.request import prepare
from tests.e2e.chat import DOCUMENT, SYSTEM, marker, text

ENABLED = "demo"  # cache-enabled in the stack, 16-token floor
DISABLED = "demo-off"  # the tokenizer knows it, the index does not
PROMPT_TOKENS = 100_000  # far above any prefix: the "never more than prompted" cap stays out
POLICY = RequestPolicy(tiers=TierPolicy(frozenset({Tier.M5, Tier.H1})))

SYSTEMS = tuple(f"{SYSTEM} House style {i}: be brief." for i in range(3))
DOCUMENTS = tuple(f"{DOCUMENT} Branch {i} of the ledger." for i in range(3))

Split = tuple[int, int, int]
"""(read, 5m creation, 1h creation); 24h is disabled in the stack and must stay 0."""


class Value(enum.Enum):
    """A usage with no split of ours."""

    INACTIVE = "inactive"
    MALFORMED = "malformed"


ZERO: Split = (0, 0, 0)
Observed = Split | Value


class Fault(enum.Enum):
    """What a single request is subjected to (dependency faults are windows in time)."""

    NONE = "none"
    UPSTREAM_RESET = "upstream_reset"
    UPSTREAM_5XX = "upstream_5xx"
    ERROR_FRAME = "error_frame"
    CLIENT_DISCONNECT = "client_disconnect"


@dataclass(frozen=True, slots=True)
class Planned:
    """One request of the campaign, fully decided by the seed."""

    index: int
    tenant: int | None  # None: no bearer token
    model: str
    marked: bool
    system: int
    document: int
    own_block: bool  # a block of its own (a write only this request can commit)
    stream: bool
    split: str
    crlf: bool
    fault: Fault
    reset_after: int | None = None  # chunks of ``split`` before the reset
    disconnect_after: int = 0  # SSE: chunks read; JSON: milliseconds waited
    chunk_delay_ms: int = 0

    @property
    def tag(self) -> str:
        return f"c{self.index}"

    def own_text(self, seed: int) -> str:
        return (
            f"Case file {seed}-{self.index}: reconcile invoice {self.index * 7919 % 100_003} "
            f"against purchase order {self.index * 104_729 % 1_000_003} and note any variance."
        )

    def body(self, seed: int) -> dict[str, Any]:
        def mark(ttl: str) -> dict[str, Any] | None:
            return marker(ttl) if self.marked else None

        user = [text(DOCUMENTS[self.document], mark("5m"))]
        if self.own_block:
            user.append(text(self.own_text(seed), mark("5m")))
        user.append(text(f"Question {self.index}: what changed since last month?"))
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": [text(SYSTEMS[self.system], mark("1h"))]},
                {"role": "user", "content": user},
            ],
        }
        if self.stream:
            body["stream"] = True
        return body


def plan(
    rng: random.Random, start: int, count: int, tenants: int, slow_share: float
) -> list[Planned]:
    """``count`` requests numbered from ``start``; ``slow_share`` of the streams trickle."""
    out = []
    for index in range(start, start + count):
        roll = rng.random()
        tenant: int | None = rng.randrange(tenants)
        model, marked = ENABLED, True
        if roll < 0.04:
            tenant = None
        elif roll < 0.08:
            model = DISABLED
        elif roll < 0.14:
            marked = False
        stream = rng.random() < 0.5
        fault = _fault(rng, stream)
        split = rng.choice(("frames", "awkward", "whole", f"bytes:{rng.randint(7, 90)}"))
        if not stream:
            split = rng.choice(("whole", f"bytes:{rng.randint(16, 200)}"))
        planned = Planned(
            index=index,
            tenant=tenant,
            model=model,
            marked=marked,
            system=rng.randrange(len(SYSTEMS)),
            document=rng.randrange(len(DOCUMENTS)),
            own_block=rng.random() < 0.6,
            stream=stream,
            split=split,
            crlf=stream and rng.random() < 0.3,
            fault=fault,
        )
        out.append(_with_fault_details(rng, planned, slow_share))
    return out


def _fault(rng: random.Random, stream: bool) -> Fault:
    roll = rng.random()
    if roll < 0.07:
        return Fault.UPSTREAM_RESET
    if roll < 0.10:
        return Fault.UPSTREAM_5XX
    if roll < 0.13 and stream:
        return Fault.ERROR_FRAME
    if roll < 0.21:
        return Fault.CLIENT_DISCONNECT
    return Fault.NONE


def _with_fault_details(rng: random.Random, p: Planned, slow_share: float) -> Planned:
    fields: dict[str, Any] = {}
    if p.fault is Fault.UPSTREAM_RESET:
        size = rng.randint(8, 160)
        length = 1600 if p.stream else 420  # about the answer's length in bytes
        fields = {"split": f"bytes:{size}", "reset_after": rng.randrange(length // size + 1)}
    elif p.fault is Fault.CLIENT_DISCONNECT:
        if p.stream:
            fields = {"chunk_delay_ms": 25, "disconnect_after": rng.randint(1, 8)}
        else:
            fields = {"split": "bytes:40", "chunk_delay_ms": 30}
            fields["disconnect_after"] = rng.randint(5, 250)
    elif p.stream and rng.random() < slow_share:
        fields = {"chunk_delay_ms": rng.randint(20, 60)}
    return Planned(**{**_fields(p), **fields})


def _fields(p: Planned) -> dict[str, Any]:
    return {name: getattr(p, name) for name in p.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class Shape:
    """What the model knows of a request: its breakpoint prefixes and their token counts."""

    raw: bytes
    prefixes: tuple[bytes, ...]  # prefix hash at each breakpoint, in order
    cumulative: tuple[int, ...]  # prefix tokens at each breakpoint
    tiers: tuple[str, ...]

    def legit_splits(self, depth: int) -> Split:
        """The split when the index already held the prefix up to breakpoint ``depth - 1``."""
        read = self.cumulative[depth - 1] if depth else 0
        created = {"5m": 0, "1h": 0}
        previous = read
        for k in range(depth, len(self.cumulative)):
            created[self.tiers[k]] += self.cumulative[k] - previous
            previous = self.cumulative[k]
        return (read, created["5m"], created["1h"])


def shape(p: Planned, seed: int, counts: Any) -> Shape:
    """``counts(texts)`` gives the real tokenizer's count of each text."""
    raw = codec.dumps(p.body(seed))
    if not p.marked:
        return Shape(raw, (), (), ())
    prepared = prepare(raw, POLICY)
    assert prepared is not None
    texts = [SYSTEMS[p.system], DOCUMENTS[p.document]]
    if p.own_block:
        texts.append(p.own_text(seed))
    per_text = counts(texts)
    cumulative = tuple(sum(per_text[: i + 1]) for i in range(len(per_text)))
    points = prepared.breakpoints
    assert [b.block for b in points] == list(range(len(texts))), points
    prefixes = tuple(bytes(prepared.hashes[b.block]) for b in points)
    return Shape(raw, prefixes, cumulative, tuple(b.tier.value for b in points))


def observed(usage: Any) -> Observed:
    """What a usage object reports, as the model compares it."""
    if not isinstance(usage, dict):
        return Value.MALFORMED
    ours = ("cache_read_input_tokens", "cache_creation_input_tokens", "cache_creation")
    details = usage.get("prompt_tokens_details")
    if not any(k in usage for k in ours) and details is None:
        plain = {"prompt_tokens", "completion_tokens", "total_tokens"}
        return Value.INACTIVE if set(usage) == plain else Value.MALFORMED
    creation = usage.get("cache_creation")
    if not isinstance(creation, dict) or not isinstance(details, dict):
        return Value.MALFORMED
    read = usage.get("cache_read_input_tokens")
    m5 = creation.get("ephemeral_5m_input_tokens")
    h1 = creation.get("ephemeral_1h_input_tokens")
    consistent = (
        details.get("cached_tokens") == read
        and creation.get("ephemeral_24h_input_tokens") == 0
        and isinstance(m5, int)
        and isinstance(h1, int)
        and usage.get("cache_creation_input_tokens") == m5 + h1
        and usage.get("prompt_tokens") == PROMPT_TOKENS
        and isinstance(read, int)
    )
    if not consistent:
        return Value.MALFORMED
    assert isinstance(read, int)
    return (read, m5, h1)


class Outcome(enum.Enum):
    """How a response ended, as far as committing goes."""

    SUCCESS = "success"  # the client got the whole 2xx answer with its usage, no error
    FAILED = "failed"  # certainly unsuccessful: nothing may be committed for it
    AMBIGUOUS = "ambiguous"  # the upstream finished but the client did not get it all


@dataclass
class Result:
    """One request as the client saw it, and what the upstream recorded of it."""

    planned: Planned
    shape: Shape
    start: float
    end: float = 0.0
    status: int | None = None
    body: bytes = b""
    error: str | None = None
    complete: bool = False
    usages: list[Observed] = field(default_factory=list)
    outcome: Outcome = Outcome.FAILED
    upstream: Any = None  # the fake upstream's Record, if it got the request


@dataclass
class Model:
    """Decides, after the run, which values and rows each request allows."""

    results: Sequence[Result]
    principals: dict[int, str]

    def __post_init__(self) -> None:
        # (principal, prefix) -> (start, index) of the requests that may have committed it
        self._writers: dict[tuple[str, bytes], list[tuple[float, int]]] = defaultdict(list)
        for r in self.results:
            if r.outcome is Outcome.FAILED or not self.accountable(r):
                continue
            for prefix in r.shape.prefixes:
                self._writers[(self.principal(r), prefix)].append((r.start, r.planned.index))
        for starts in self._writers.values():
            starts.sort()

    def principal(self, r: Result) -> str:
        assert r.planned.tenant is not None
        return self.principals[r.planned.tenant]

    @staticmethod
    def accountable(r: Result) -> bool:
        p = r.planned
        return p.tenant is not None and p.model == ENABLED and p.marked

    def may_be_committed(self, principal: str, prefix: bytes, before: float, own: int) -> bool:
        """Some other request of ``principal`` with ``prefix`` began before ``before``."""
        starts = self._writers.get((principal, prefix), [])
        return any(s < before and i != own for s, i in starts)

    def legit(self, r: Result) -> set[Observed]:
        """The fault-free values of ``r``'s usage."""
        p = r.planned
        if p.tenant is None or p.model != ENABLED:
            return {Value.INACTIVE}
        if not p.marked:
            return {ZERO}
        values = {r.shape.legit_splits(0)}
        principal = self.principal(r)
        for depth, prefix in enumerate(r.shape.prefixes, start=1):
            if self.may_be_committed(principal, prefix, r.end, p.index):
                values.add(r.shape.legit_splits(depth))
        return values

    def row_allowed(self, principal: str, prefix: bytes) -> bool:
        return (principal, prefix) in self._writers

    def expected_rows(self) -> Iterable[tuple[str, bytes, int, str]]:
        """Every (principal, prefix, tokens, tier) some non-failed request may have written."""
        seen = set()
        for r in self.results:
            if r.outcome is Outcome.FAILED or not self.accountable(r):
                continue
            principal = self.principal(r)
            for k, prefix in enumerate(r.shape.prefixes):
                key = (principal, prefix, r.shape.cumulative[k], r.shape.tiers[k])
                if key not in seen:
                    seen.add(key)
                    yield key
