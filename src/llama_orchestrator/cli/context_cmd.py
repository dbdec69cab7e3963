"""context create | ls | use | rm: the machines `--host` may name (as `docker context`)."""

from __future__ import annotations

from typing import Any

import typer

from llama_orchestrator.cli.context import print_json, say
from llama_orchestrator.present import columns

__all__ = ["app"]

app = typer.Typer(
    help="Other machines to run commands on, over SSH (like `docker context`).",
    no_args_is_help=True,
)


@app.command()
def create(
    name: str = typer.Argument(..., metavar="NAME"),
    host: str = typer.Option(
        ...,
        "--host",
        metavar="URL",
        help="ssh://USER@HOST:PORT/HOME (user, port and home optional).",
    ),
    remote_command: str = typer.Option(
        "llama-orch",
        "--remote-command",
        metavar="PATH",
        help="The llama-orch to run there, when ssh's PATH lacks it (e.g. ~/venv/bin/llama-orch).",
    ),
    description: str = typer.Option("", "--description", help="A note shown by `context ls`."),
    force: bool = typer.Option(False, "--force", help="Replace a context of that name."),
) -> None:
    """Name a machine: `--host NAME` and `context use NAME` then reach it."""
    from llama_orchestrator.hosts.contexts import Context, Contexts

    Contexts().create(Context(name, host, remote_command, description), force)
    say(f"Created context '{name}' ({host}); `llama-orch context use {name}` makes it current.")


@app.command("ls")
def ls(json_: bool = typer.Option(False, "--json", help="JSON output.")) -> None:
    """The contexts, the current one marked *."""
    from llama_orchestrator.hosts.contexts import DEFAULT, Contexts

    store = Contexts()
    current = store.current()
    rows: list[dict[str, Any]] = [
        {
            "name": DEFAULT,
            "host": None,
            "current": current == DEFAULT,
            "description": "this machine",
        }
    ] + [
        {
            "name": c.name,
            "host": c.host,
            "remote_command": c.remote_command,
            "current": current == c.name,
            "description": c.description,
        }
        for c in store.all()
    ]
    if json_:
        print_json(rows)
        return
    cells = [
        [r["name"] + (" *" if r["current"] else ""), r["host"] or "-", r["description"] or ""]
        for r in rows
    ]
    say(columns(["NAME", "HOST", "DESCRIPTION"], cells))


@app.command()
def use(name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Run later commands on NAME (`default`: this machine)."""
    from llama_orchestrator.hosts.contexts import Contexts

    Contexts().use(name)
    say(f"Commands now run on '{name}'.")


@app.command("rm")
def rm(name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Forget a context (the machine itself is not touched)."""
    from llama_orchestrator.hosts.contexts import Contexts

    Contexts().remove(name)
    say(f"Removed context '{name}'.")
