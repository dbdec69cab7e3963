"""gpus, models list, models inspect."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llama_orchestrator.cli.context import app_context, err, out, print_json, say
from llama_orchestrator.gguf_meta import estimate, read_model, scan_models
from llama_orchestrator.present import GPU_COLUMNS, gpu_cells
from llama_orchestrator.units import human_bytes, human_count

__all__ = ["register"]

models_app = typer.Typer(
    help="Read GGUF models: metadata and memory estimates.", no_args_is_help=True
)


def gpus(
    ctx: typer.Context, json_: bool = typer.Option(False, "--json", help="JSON output.")
) -> None:
    """GPUs with VRAM, utilisation, temperature, power and the instances pinned to each."""
    app = app_context(ctx)
    from llama_orchestrator.engine import views

    status = views.gpu_sample(app.engine)
    found, warnings, source = status.gpus, status.warnings, status.source
    if json_:
        print_json([g.to_json() for g in found])
    elif not found:
        say("no GPU found (looked for NVML, nvidia-smi and rocm-smi)")
    else:
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for col in GPU_COLUMNS:
            table.add_column(col, no_wrap=col != "INSTANCES")
        for g in found:
            row, hot = gpu_cells(g, status.threshold)
            if hot:
                temp = GPU_COLUMNS.index("TEMP")
                row[temp] = f"[bold red]{row[temp]}[/]"
            table.add_row(*row)
        out.print(table)
        out.print(f"[dim](from {source})[/]")
    for w in warnings:
        err.print(f"warning: {w}", markup=False)


@models_app.command("list")
def models_list(
    ctx: typer.Context,
    folder: Optional[Path] = typer.Argument(
        None, help="Folder to search (default: <home>/models, else .).", metavar="DIR"
    ),
    json_: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Every .gguf file under a folder, with its metadata."""
    app = app_context(ctx)
    root = folder or (
        app.home.root / "models" if (app.home.root / "models").is_dir() else Path.cwd()
    )
    rows = scan_models(root)
    if json_:
        print_json(rows)
        return
    if not rows:
        say(f"no .gguf files under {root}")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("MODEL", "ARCH", "PARAMS", "QUANT", "CONTEXT", "LAYERS", "SIZE"):
        table.add_column(col)
    for r in rows:
        name = str(Path(r["path"]).relative_to(root))
        if "error" in r:
            table.add_row(name, f"[red]{r['error']}[/]", "", "", "", "", "")
            continue
        table.add_row(
            name,
            r["architecture"],
            human_count(r["parameters"]),
            r["file_type"],
            str(r["context_length"] or "-"),
            str(r["layers"]),
            human_bytes(r["size_bytes"]),
        )
    out.print(table)


@models_app.command("inspect")
def models_inspect(
    path: Path = typer.Argument(..., help="A .gguf file.", metavar="PATH"),
    ctx_size: int = typer.Option(
        4096, "--ctx", help="Context size for the estimate (0: the model's)."
    ),
    parallel: int = typer.Option(1, "--parallel", help="Slots (-np) for the estimate."),
    layers: int = typer.Option(
        -1, "--layers", help="Layers on the GPU for the estimate (-1: all)."
    ),
    json_: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Metadata of one model and the memory it needs."""
    info = read_model(path)
    est = estimate(info, ctx_size, parallel, layers)
    data = {**info.to_json(), "estimate": est.to_json()}
    if json_:
        print_json(data)
        return
    for key, value in info.to_json().items():
        if key not in ("parameters", "size_bytes"):  # shown below, formatted
            say(f"{key:<17} {value}")
    say(f"{'parameters':<17} {info.parameters:,} ({human_count(info.parameters)})")
    say(f"{'size':<17} {human_bytes(info.size_bytes)} ({info.size_bytes:,} bytes)")
    say(
        f"estimate for -c {est.context} -np {parallel} -ngl {'all' if layers < 0 else layers}"
        f" ({est.context_per_slot} tokens per slot):"
    )
    say(
        f"  on the GPU(s)   {human_bytes(est.gpu_bytes)} = weights {human_bytes(est.weights_gpu_bytes)} + KV cache "
        f"{human_bytes(est.kv_gpu_bytes)} + overhead {human_bytes(est.overhead_bytes)}"
    )
    say(f"  on the host     {human_bytes(est.host_bytes)}")


def register(app: typer.Typer) -> None:
    app.command()(gpus)
    app.add_typer(models_app, name="models")
