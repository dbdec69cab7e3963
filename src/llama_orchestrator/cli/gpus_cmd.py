"""gpus: the cards, their use and the instances pinned to each."""

from __future__ import annotations

import typer

from llama_orchestrator.cli.context import app_context, err, out, print_json, say
from llama_orchestrator.present import (
    GPU_COLUMNS,
    build_label,
    gpu_cells,
    unknown_line,
    unlisted_line,
)

__all__ = ["register"]


def gpus(
    ctx: typer.Context, json_: bool = typer.Option(False, "--json", help="JSON output.")
) -> None:
    """GPUs with VRAM, utilisation, temperature, power and the instances pinned to each."""
    app = app_context(ctx)
    from llama_orchestrator.engine import views

    busy = app.control().activity().in_flight
    status = views.gpu_sample(app.engine, lambda n: busy.get(n, 0) > 0)
    found, warnings, source = status.gpus, status.warnings, status.source
    if json_:
        print_json([g.to_json() for g in found])
    elif not found:
        say("no GPU found (looked for NVML, nvidia-smi, rocm-smi and vulkaninfo)")
    else:
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        # LEASE only while a script task holds a card; under 100 columns, no
        # FREE (VRAM's difference), nor BACKEND when every card has the same
        hidden = set() if any(g.lease for g in found) else {"LEASE"}
        if out.width < 100:
            hidden.add("FREE")
            if len({g.backend for g in found}) == 1:
                hidden.add("BACKEND")
        shown = [c for c in GPU_COLUMNS if c not in hidden]
        for col in shown:
            table.add_column(col, no_wrap=col not in ("LEASE", "INSTANCES"))
        for g in found:
            cells, hot = gpu_cells(g, status.threshold)
            if hot:
                temp = GPU_COLUMNS.index("TEMP")
                cells[temp] = f"[bold red]{cells[temp]}[/]"
            table.add_row(*(v for c, v in zip(GPU_COLUMNS, cells, strict=True) if c in shown))
        out.print(table)
        out.print(f"[dim](from {source})[/]")
        for g in found:
            if line := unknown_line(g, source):
                out.print(f"[dim]{line}[/]")
    if not json_:
        for d in status.unlisted:
            say(unlisted_line(d, source))
        for build, names in views.builds_in_use(app.engine):
            used = f"; runs {', '.join(names)}" if names else ""
            say(f"llama-server {build_label(build.to_json())}{used}")
    for w in warnings:
        err.print(f"warning: {w}", markup=False)


def register(app: typer.Typer) -> None:
    app.command()(gpus)
