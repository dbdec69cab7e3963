"""dashboard."""

from __future__ import annotations

import typer

from llama_orchestrator.cli.context import app_context

__all__ = ["dashboard"]


def dashboard(
    ctx: typer.Context,
    refresh: float = typer.Option(2.0, help="Seconds between refreshes."),
) -> None:
    """A live view of every instance: state, resources, logs, events, GPUs; u/d/r to act."""
    from llama_orchestrator.tui.app import DashboardApp  # Textual loads only for this command
    from llama_orchestrator.tui.data import EngineSource

    source = EngineSource(app_context(ctx).home)
    try:
        DashboardApp(source, refresh=refresh).run()
    finally:
        source.close()
