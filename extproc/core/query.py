"""The ``cacheBreakpoint`` query parameter of a chat route (DESIGN §3.0.1).

Rules:
* the name and the value are compared raw (not percent-decoded) and case-sensitively; the
  first occurrence decides;
* ``lastUserMessage`` asks for automatic caching; any other value, empty included, is refused
  with the reference's message;
* every occurrence is removed from the forwarded path, the other parameters keep their order
  and spelling, and no ``?`` is left behind when no other parameter remains (empty ones
  between ``&`` do not count).
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.core import codec
from extproc.core.errors import BreakpointParamError

PARAM = "cacheBreakpoint"
SUPPORTED = "lastUserMessage"


@dataclass(frozen=True, slots=True)
class BreakpointParam:
    """A path that carried the parameter: the path to forward instead."""

    path: str


def read_breakpoint_param(path: str) -> BreakpointParam | None:
    """``None`` when ``path`` has no ``cacheBreakpoint``; raises ``BreakpointParamError``."""
    base, sep, query = path.partition("?")
    if not sep or PARAM not in query:
        return None
    params = query.split("&")
    values = [value for name, _, value in (p.partition("=") for p in params) if name == PARAM]
    if not values:
        return None
    if values[0] != SUPPORTED:
        raise BreakpointParamError(
            f'invalid {PARAM} value {codec.quote(values[0])}; supported values: "{SUPPORTED}"'
        )
    kept = [p for p in params if p.partition("=")[0] != PARAM]
    return BreakpointParam(base + ("?" + "&".join(kept) if any(kept) else ""))
