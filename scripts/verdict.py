"""The outcome of a check of generated files: what is stale (exit 1), or that all is current."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def report(stale: Sequence[str], failed: str, passed: str) -> int:
    """Print ``failed`` and one indented line per stale item to stderr, or ``passed``."""
    if not stale:
        print(passed)
        return 0
    print(failed, file=sys.stderr)
    for line in stale:
        print(f"  {line}", file=sys.stderr)
    return 1
