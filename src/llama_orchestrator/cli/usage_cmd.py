"""`llama-orch usage`: what the external upstreams cost (thin: the sums are
`upstreams.usage_summary`)."""

from __future__ import annotations

import time
from typing import Optional

import typer

from llama_orchestrator.cli.context import app_context, print_json, say
from llama_orchestrator.present import columns
from llama_orchestrator.timefmt import parse_since


def usage(
    ctx: typer.Context,
    since: Optional[str] = typer.Option(
        "1d", metavar="WHEN", help="Since then: 10m, 2h, 1d, 30d or an ISO time."
    ),
    json_: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Requests, tokens and cost of the external upstreams, by upstream, model and plan."""
    from llama_orchestrator.upstreams import usage_summary  # lazily: pydantic, ~180 ms

    engine = app_context(ctx).engine
    start = parse_since(since, time.time()) if since else 0.0
    summary = usage_summary(engine.store.usage(since=start))
    if json_:
        print_json({"since": start, **summary})
        return
    rows = summary["rows"]
    if not rows:
        say(f"No requests to an external upstream since {since}.")
        return
    cells = [
        [
            r["upstream"],
            r["model"],
            r["plan_run"] or "-",
            str(r["requests"]),
            str(r["tokens_in"]),
            str(r["tokens_out"]),
            f"{r['cost']:.4f}",
        ]
        for r in rows
    ]
    t = summary["total"]
    cells.append(
        [
            "total",
            "",
            "",
            str(t["requests"]),
            str(t["tokens_in"]),
            str(t["tokens_out"]),
            f"{t['cost']:.4f}",
        ]
    )
    say(
        columns(
            ["UPSTREAM", "MODEL", "PLAN RUN", "REQUESTS", "TOKENS IN", "TOKENS OUT", "COST"], cells
        )
    )
