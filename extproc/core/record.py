"""The accounting record of one request (DESIGN §13): what billing reads in Envoy's access log.

Rules:
* one record per request on any route whose answer the session settled or let pass (``Settled``,
  ``Unwatched``), active, zero-active and inactive alike; an inactive one says why (``reason``);
* the split is the one the client saw: the engine's own read for an engine read, capped by
  ``prompt_tokens`` the way the usage edit caps it; no usage seen, no cap; ``prompt_tokens``
  is the upstream's whole prompt in that API's terms (chat ``prompt_tokens``, Responses
  ``input_tokens``, Messages the sum of its three input counts); ``route`` names the API;
* a stream whose final usage went out before its end gets a record then, with the commit
  ``no_end_of_stream``; the record of its end replaces every field (a stream cut in between
  keeps the first);
* ``commit`` is ``scheduled`` when a write goes to the index, the veto reason when the verdict
  refused the response, ``none`` when there was nothing to commit and ``unwatched`` when an
  answer that had something to commit passed unseen;
* the record holds counts, enum values, the model alias a classification confirmed and the
  resolved tenant id: never prompt text, a key or a key's hash.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc.core.dialects import chat
from extproc.core.dialects.api import Dialect
from extproc.core.model import Classification, Split, Tier
from extproc.core.phases import Settled, Unwatched, UsageSent
from extproc.core.usage import capped
from extproc.core.verdict import VetoReason

NAMESPACE = "extproc.prompt_cache"
DEFAULT_DIALECT = chat.DIALECT  # a stream that ended before its route was known


class Commit(enum.Enum):
    """What happened to the request's write, when no veto names it."""

    SCHEDULED = "scheduled"
    NONE = "none"
    UNWATCHED = "unwatched"


class ReadSource(enum.Enum):
    """Where the read came from: this sidecar's index, the engine's cache, or nowhere."""

    INDEX = "index"
    ENGINE = "engine"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Record:
    """The fields of the ``extproc.prompt_cache`` dynamic metadata, one request's accounting."""

    outcome: str
    reason: str
    model: str | None
    principal: str | None
    route: str
    prompt_tokens: int | None
    split: Split
    read_source: ReadSource
    commit: str

    def fields(self) -> dict[str, str | int | None]:
        """The record as the flat mapping Envoy stores and the access log prints."""
        return {
            "outcome": self.outcome,
            "reason": self.reason,
            "model": self.model,
            "principal": self.principal,
            "route": self.route,
            "prompt_tokens": self.prompt_tokens,
            "read": self.split.read,
            "creation_5m": self.split.created(Tier.M5),
            "creation_1h": self.split.created(Tier.H1),
            "creation_24h": self.split.created(Tier.H24),
            "read_source": self.read_source.value,
            "commit": self.commit,
        }


def of_settled(settled: Settled, dialect: Dialect) -> Record:
    """The record of a settled response (the reply that completes it carries it)."""
    veto = settled.verdict.veto
    if veto is not None:
        commit = veto.value
    elif settled.pending is not None and not settled.pending.is_empty:
        commit = Commit.SCHEDULED.value
    else:
        commit = Commit.NONE.value
    return _record(settled.classification, settled.usage, dialect, commit)


def of_usage_sent(sent: UsageSent, dialect: Dialect) -> Record:
    """The record of a stream whose final usage went out: not committed until its end."""
    commit = VetoReason.NO_END_OF_STREAM.value
    return _record(sent.classification, sent.usage, dialect, commit)


def of_unwatched(unwatched: Unwatched, fallback: Classification, dialect: Dialect) -> Record:
    """The record of an answer passed unedited; ``fallback`` when nothing was known yet."""
    classification = unwatched.classification or fallback
    pending = classification.pending
    lost = pending is not None and not pending.is_empty
    commit = Commit.UNWATCHED if lost else Commit.NONE
    return _record(classification, None, dialect, commit.value)


def _record(
    classification: Classification | None,
    usage: Mapping[str, Any] | None,
    dialect: Dialect,
    commit: str,
) -> Record:
    found = classification or Classification.inactive("not_joined")
    prompt_tokens = None if usage is None else dialect.prompt_tokens(usage)
    return Record(
        outcome=found.outcome.value,
        reason=found.reason,
        model=found.model,
        principal=found.principal,
        route=dialect.route,
        prompt_tokens=prompt_tokens,
        split=_seen_split(found, usage, prompt_tokens, dialect),
        read_source=_source(found),
        commit=commit,
    )


def _seen_split(
    classification: Classification,
    usage: Mapping[str, Any] | None,
    prompt_tokens: int | None,
    dialect: Dialect,
) -> Split:
    split = classification.split
    if split is None:
        return Split()
    if classification.engine:  # the engine's own read, where that API reports it
        split = dialect.engine_read(usage) if usage is not None else Split()
    return split if prompt_tokens is None else capped(split, prompt_tokens)


def _source(classification: Classification) -> ReadSource:
    if classification.split is None:
        return ReadSource.NONE
    return ReadSource.ENGINE if classification.engine else ReadSource.INDEX
