"""The defaults that more than one module relies on, each defined once.

The settings (``extproc.config``) start from these; the session, the join deadlines, the
tokenizer client, the Envoy renderer and the health service take them from here.
"""

from __future__ import annotations

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
"""The gRPC service (and health service name) of ext_proc."""

ENVOY_FILTER_NAME = "envoy.filters.http.ext_proc"
"""The ext_proc filter's name in Envoy configs (and the namespace of its attributes)."""

MAX_BODY_BYTES = 8 << 20
CLASSIFY_DEADLINE_MS = 5000
COMMIT_DEADLINE_MS = 2000
ENVOY_MESSAGE_TIMEOUT_MS = 2000
ENVOY_MAX_MESSAGE_TIMEOUT_MS = 30000


def reply_margin_ms(message_timeout_ms: int) -> int:
    """How much of Envoy's message timeout a reply leaves for the trip: a quarter, >= 100 ms."""
    return max(100, message_timeout_ms // 4)


def reply_budget_ms(message_timeout_ms: int) -> int:
    """How long a reply may wait before it must extend Envoy's timer."""
    return max(0, message_timeout_ms - reply_margin_ms(message_timeout_ms))
