"""system remote: the far end of `--host ssh://…` (see `llama_orchestrator.remote`)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer

from llama_orchestrator import __version__
from llama_orchestrator.errors import UserError

__all__ = ["app"]

app = typer.Typer(help="What other machines' llama-orch runs here.", hidden=True)


@app.command(hidden=True)
def remote(payload: str = typer.Argument(..., metavar="PAYLOAD")) -> None:
    """Run the argv another machine's `--host ssh://…` sent, if its version is ours."""
    from llama_orchestrator.cli import context
    from llama_orchestrator.cli.app import main
    from llama_orchestrator.remote import MARKER, decode_payload, version_mismatch

    if not sys.stderr.isatty():  # over ssh -T: what follows on stderr is ours, not ssh's
        sys.stderr.write(f"{MARKER}{__version__}\n")
        sys.stderr.flush()
        from llama_orchestrator import platform

        # no terminal whose close ends us: the client's going away must (`logs -f`)
        with contextlib.suppress(OSError, ValueError):  # no file under us: nobody to watch
            platform.interrupt_on_hangup(sys.stdout.fileno())
    theirs, argv, machine = decode_payload(payload)
    if problem := version_mismatch(theirs, __version__, machine):
        raise UserError(problem)
    context.MACHINE = machine or None
    main(argv, here=True)


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
