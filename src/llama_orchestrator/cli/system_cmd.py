"""system remote: the far end of `--host ssh://…` (see `llama_orchestrator.remote`)."""

from __future__ import annotations

import sys

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
    theirs, argv, machine = decode_payload(payload)
    if problem := version_mismatch(theirs, __version__, machine):
        raise UserError(problem)
    context.MACHINE = machine or None
    main(argv, here=True)
