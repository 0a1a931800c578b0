"""The interface every API dialect fills in: its route, its body's blocks, its answer's usage.

Rules:
* a dialect owns what differs between APIs: the path suffix it serves, the shape its body is
  read with, where blocks and markers are (``layout``), what a body without blocks of ours
  still needs (``plain_body``), its 400 envelope, and how its answers carry usage (``answer``,
  one reader per response, which may keep state across a stream's events);
* and what the accounting record reads of a usage object in that API's terms: the route's name
  (``route``), the whole prompt as the upstream counted it (``prompt_tokens``) and the engine's
  own prefix-cache read (``engine_read``);
* nothing else is a dialect's: scope, walk-back, tiers, floor, index and commit are shared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from extproc.core.dialects.blocks import Layout
from extproc.core.errors import ClientError
from extproc.core.model import RequestPolicy, Split
from extproc.core.spans import Node, Shape, Splice
from extproc.core.sse import EventGrammar
from extproc.core.usage import DocumentEdit, UsageRule


class Answer(EventGrammar, Protocol):
    """One response of a dialect: its stream events, or its whole JSON body."""

    def edit_body(self, text: str, rule: UsageRule) -> DocumentEdit | None:
        """The whole JSON body with ``rule`` applied; ``None`` when it is not an object."""
        ...


@dataclass(frozen=True, slots=True)
class Dialect:
    """One API: see the module rules."""

    name: str
    suffix: str
    shape: Shape
    layout: Callable[[Node, RequestPolicy, Splice], Layout]
    plain_body: Callable[[bytes, bool], bytes]
    error_envelope: Callable[[ClientError], bytes]
    answer: Callable[[], Answer]
    route: str
    prompt_tokens: Callable[[Mapping[str, Any]], int | None]
    engine_read: Callable[[Mapping[str, Any]], Split]
    breakpoint_param: bool = False

    def serves(self, method: str, path: str) -> bool:
        """``POST`` to a path ending in this dialect's suffix, query string excluded."""
        return method == "POST" and path.partition("?")[0].endswith(self.suffix)
