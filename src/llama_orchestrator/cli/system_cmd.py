"""system task: a plan task another machine's daemon runs here (`plans.hosts`).

The far end of `--host ssh://…`, `system remote`, is the entry point's
(`cli.app.main`): it runs a whole command line, not one command."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

__all__ = ["app"]

app = typer.Typer(help="What other machines' llama-orch runs here.", hidden=True)


@app.command(hidden=True)
def task(
    ctx: typer.Context,
    origin: str = typer.Option(..., "--origin", help="The sending plan's run and task."),
) -> None:
    """Run the one-task plan on stdin here for another machine's plan (its
    `host`), or follow the run already started for `origin`; print the run's
    id as a JSON line at once, and its end (state, error, output) as another."""
    import json

    from llama_orchestrator.cli.context import app_context
    from llama_orchestrator.plans.ops import for_peer

    app_ctx = app_context(ctx)
    text = sys.stdin.read()
    control = app_ctx.control(start_daemon=True, says="Started the llama-orch daemon (pid {pid}).")

    def submit(path: Path, plan: str) -> str:
        return control.submit_plan(path, plan, {}).id

    def started(run_id: str) -> None:
        sys.stdout.write(json.dumps({"run": run_id}) + "\n")
        sys.stdout.flush()

    end = for_peer(app_ctx.home, app_ctx.engine.store, submit, text, origin, started)
    sys.stdout.write(json.dumps(end) + "\n")
