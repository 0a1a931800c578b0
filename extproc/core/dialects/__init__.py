"""Request dialects: one module per API, each finding its blocks, markers and usage."""

from __future__ import annotations

from extproc.core.dialects import chat, messages, responses
from extproc.core.dialects.api import Answer, Dialect

__all__ = ["ALL", "Answer", "Dialect", "by_name", "for_request"]

ALL: tuple[Dialect, ...] = (chat.DIALECT, messages.DIALECT, responses.DIALECT)
_BY_NAME = {dialect.name: dialect for dialect in ALL}


def for_request(method: str, path: str) -> Dialect | None:
    """The dialect serving ``method`` and ``path`` (query excluded), ``None`` when none does."""
    for dialect in ALL:
        if dialect.serves(method, path):
            return dialect
    return None


def by_name(name: str) -> Dialect:
    """The dialect called ``name`` (``chat``, ``messages``, ``responses``)."""
    return _BY_NAME[name]
