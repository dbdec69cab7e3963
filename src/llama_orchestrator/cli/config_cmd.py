"""config validate | schema | show."""

from __future__ import annotations

import json
from typing import Optional

import typer

from llama_orchestrator.cli.context import app_context, err, out, print_json
from llama_orchestrator.errors import ConfigError, UnknownInstance

__all__ = ["app"]

app = typer.Typer(help="Check and show instance configs.", no_args_is_help=True)


@app.command()
def validate(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, metavar="NAME"),
    strict: bool = typer.Option(False, "--strict", help="Treat VRAM overcommit as an error."),
) -> None:
    """Check every instance (or one): schema, ports, model files, llama-server, VRAM."""
    a = app_context(ctx)
    names = a.engine.resolve_names([name]) if name else None
    from llama_orchestrator.config.validate import validate_home

    problems = validate_home(a.home, names, strict=strict)
    errors = [p for p in problems if p.severity == "error"]
    for p in problems:
        if p.severity == "warning":
            err.print(f"warning: {p}", markup=False)
    if errors:
        raise ConfigError(errors)
    count = len(names) if names else len(a.home.instance_names())
    settings = " and llama-orch.json" if a.home.settings_path.is_file() else ""
    out.print(f"{count} instance config{'s' if count != 1 else ''}{settings} OK")


@app.command()
def schema() -> None:
    """Print the JSON Schema of instances/<name>/config.json (for editors)."""
    from llama_orchestrator.config.instance import InstanceConfig

    print_json(InstanceConfig.model_json_schema())


@app.command()
def show(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Print an instance's config with defaults filled in and secrets hidden."""
    a = app_context(ctx)
    (name,) = a.engine.resolve_names([name])
    from llama_orchestrator.config.parse import redacted
    from llama_orchestrator.config.validate import load_all

    item = next((x for x in load_all(a.home) if x.name == name), None)
    if item is None:  # known to the store only: its config folder is gone
        raise UnknownInstance(name, a.home.instance_names())
    if item.config is None:
        raise ConfigError(item.problems)
    out.print_json(json.dumps(redacted(item.config)))
