"""``extproc report``: what the prefix index holds, per principal and model.

What an operator runs when a tenant asks why a prompt did not cache: per principal and model,
the live entries, the prompt tokens their prefixes hold in each tier and the soonest expiry
(expired entries the sweeper has not removed yet are left out). Read-only.
"""

from __future__ import annotations

import argparse

from extproc.commands.admin import show
from extproc.commands.database import connect, database_command

COLUMNS = (
    "principal",
    "model",
    "live_entries",
    "tokens_5m",
    "tokens_1h",
    "tokens_24h",
    "oldest_expiry",
)

_REPORT = """
SELECT principal_id, virtual_model, count(*),
       coalesce(sum(cumulative_token_count) FILTER (WHERE ttl_tier = '5m'), 0)::bigint,
       coalesce(sum(cumulative_token_count) FILTER (WHERE ttl_tier = '1h'), 0)::bigint,
       coalesce(sum(cumulative_token_count) FILTER (WHERE ttl_tier = '24h'), 0)::bigint,
       min(expires_at)
FROM prompt_cache_entries
WHERE expires_at > now()
  AND (%(principal)s::text IS NULL OR principal_id = %(principal)s)
  AND (%(model)s::text IS NULL OR virtual_model = %(model)s)
GROUP BY principal_id, virtual_model
ORDER BY principal_id, virtual_model
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "report",
        help="live index entries per principal and model: tokens held per tier, oldest expiry",
    )
    parser.add_argument("--principal", help="only this principal (the tenant id)")
    parser.add_argument("--model", help="only this model alias")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=report)


@database_command
def report(args: argparse.Namespace) -> int:
    with connect() as conn:
        rows = conn.execute(_REPORT, {"principal": args.principal, "model": args.model}).fetchall()
    show(COLUMNS, rows, as_json=args.json)
    return 0
