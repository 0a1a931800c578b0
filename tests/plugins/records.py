"""The accounting record's fields as DESIGN §13 lists them, for every test that reads one."""

from __future__ import annotations

RECORD_FIELDS = frozenset(
    {
        "outcome",
        "reason",
        "model",
        "principal",
        "route",
        "prompt_tokens",
        "read",
        "creation_5m",
        "creation_1h",
        "creation_24h",
        "read_source",
        "commit",
    }
)
