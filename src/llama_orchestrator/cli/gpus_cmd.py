"""gpus: the cards, their use and the instances pinned to each."""

from __future__ import annotations

from typing import Any

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
    ctx: typer.Context,
    json_: bool = typer.Option(False, "--json", help="JSON output."),
    all_nodes: bool = typer.Option(
        False, "--all-nodes", help="A cluster home: every node's cards, from Ray's ledger."
    ),
) -> None:
    """GPUs with VRAM, utilisation, temperature, power and the instances pinned to each."""
    app = app_context(ctx)
    if all_nodes:
        _all_nodes(app, json_)
        return
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


def _all_nodes(app: Any, json_: bool) -> None:
    """`gpus --all-nodes`: each card of each node, its free MiB and what runs on it."""
    from llama_orchestrator.cli.cluster_cmd import cluster_settings
    from llama_orchestrator.cluster.placement import cards_in_use
    from llama_orchestrator.cluster.rayclient import look
    from llama_orchestrator.engine.views import on_nodes

    _, nodes = look(cluster_settings(app), app.home.root)
    cards = cards_in_use(nodes, on_nodes(app.engine))
    if json_:
        print_json(cards)
        return
    if not cards:
        say("no node of the cluster declares a card (`llama-orch cluster start --gpu-mib`)")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NODE", "GPU", "VRAM MiB", "FREE MiB", "INSTANCES"):
        table.add_column(col)
    for c in cards:
        node = c["node"] + ("" if c["alive"] else " (dead)")
        table.add_row(
            node,
            str(c["index"]),
            str(c["memory_total_mib"]),
            str(c["memory_free_mib"]),
            ", ".join(c["instances"]) or "-",
        )
    out.print(table)
    out.print("[dim](from Ray's ledger: each card's declared VRAM and what instances hold)[/]")


def register(app: typer.Typer) -> None:
    app.command()(gpus)
