"""cluster start | status | render: a Ray cluster as the engine past a few machines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from llama_orchestrator.cli.context import app_context, out, print_json, say
from llama_orchestrator.errors import OrchError, UserError

__all__ = ["app", "cluster_settings"]

app = typer.Typer(
    help="Run this home's instances on a Ray cluster (pip install 'llama-orch[ray]').",
    no_args_is_help=True,
)


def _cards(gpu_mib: str | None) -> list[int]:
    """Each card's MiB: given, or found here (NVML, nvidia-smi, rocm-smi, vulkaninfo)."""
    if gpu_mib is not None:
        try:
            cards = [int(x) for x in gpu_mib.split(",") if x.strip()]
        except ValueError:
            raise UserError(
                f"--gpu-mib takes each card's MiB, comma-separated (e.g. 6144,6144), not {gpu_mib!r}."
            ) from None
        if any(c <= 0 for c in cards):
            raise UserError("--gpu-mib takes each card's MiB as a positive number.")
        return cards
    from llama_orchestrator.gpus.discover import discover

    return [g.memory_total_mib for g in discover().gpus]


@app.command()
def start(
    ctx: typer.Context,
    head: bool = typer.Option(False, "--head", help="Start the cluster's head here."),
    address: Optional[str] = typer.Option(
        None, "--address", metavar="HOST:PORT", help="Join the cluster whose head is there."
    ),
    node_name: Optional[str] = typer.Option(
        None, "--node-name", help="What placement.node calls this machine (default: its hostname)."
    ),
    ip: Optional[str] = typer.Option(
        None, "--ip", help="This machine's address on the cluster's network."
    ),
    port: int = typer.Option(6379, "--port", help="The head's port (with --head)."),
    gpu_mib: Optional[str] = typer.Option(
        None,
        "--gpu-mib",
        metavar="MIB,MIB",
        help="Each card's VRAM in MiB, instead of the cards found here.",
    ),
    instances: bool = typer.Option(
        True,
        "--instances/--no-instances",
        help="Whether instances may run here (--no-instances: a head that only coordinates).",
    ),
    block: bool = typer.Option(
        False,
        "--block",
        help="Stay in the foreground (for a service); a node whose Ray ends rejoins.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the `ray start` command only."),
) -> None:
    """Make this machine the head or a node of a Ray cluster, with token auth and no dashboard."""
    from llama_orchestrator.cluster.rayclient import TOKEN_HINT, token_source
    from llama_orchestrator.cluster.start import START_ENV, ray_start_argv

    if head == bool(address):
        raise UserError("Give --head to start a cluster, or --address HOST:PORT to join one.")
    if not dry_run and token_source() is None:
        raise UserError(
            "No Ray token is set on this machine, so no cluster is started or joined.",
            hint=TOKEN_HINT,
        )
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    if not dry_run and not Path(ray).exists():
        raise UserError("Ray is not installed here.", hint="pip install 'llama-orch[ray]'.")
    import socket

    argv = ray_start_argv(
        ray,
        head=head,
        address=address,
        node_name=node_name or socket.gethostname(),
        ip=ip,
        port=port,
        cards_mib=_cards(gpu_mib),
        instances=instances,
        block=block,
    )
    if dry_run:
        say(" ".join(argv))
        return
    env = {**os.environ, **START_ENV}
    if block:
        from llama_orchestrator.cluster.node import run_blocking

        code = run_blocking(argv, env, not head, lambda m: say(m, to_err=True))
    else:
        code = subprocess.call(argv, env=env)
    if code:
        raise OrchError(f"`ray start` failed (exit {code}); its output above says why.")


def cluster_settings(app: Any) -> Any:
    """The home's `cluster` settings; UserError when it has none."""
    settings = app.engine.settings.cluster
    if settings is None:
        raise UserError(
            "This home runs its instances on this machine (no `cluster` in llama-orch.json).",
            hint='Add {"cluster": {"address": "HEAD:6379"}} to llama-orch.json (docs/scaling.md).',
        )
    return settings


@app.command()
def status(
    ctx: typer.Context, json_: bool = typer.Option(False, "--json", help="JSON output.")
) -> None:
    """The cluster's nodes, their cards and free VRAM, and what runs where."""
    from llama_orchestrator.cluster.rayclient import look
    from llama_orchestrator.engine.views import on_nodes

    app = app_context(ctx)
    settings = cluster_settings(app)
    namespace, nodes = look(settings, app.home.root)
    where: dict[str, list[str]] = {}
    for name, node, _ in on_nodes(app.engine):
        where.setdefault(node, []).append(name)
    if json_:
        print_json(
            {
                "address": settings.address,
                "namespace": namespace,
                "nodes": [{**n.to_json(), "instances": where.get(n.name, [])} for n in nodes],
            }
        )
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NODE", "IP", "STATE", "GPUS (free/total MiB)", "INSTANCES"):
        table.add_column(col)
    for n in nodes:
        cards = ", ".join(f"{c.index}: {c.free_mib}/{c.total_mib}" for c in n.cards) or "-"
        state = ("up" if n.alive else "dead") + ("" if n.ours else " (no llama-orch)")
        table.add_row(n.name, n.ip, state, cards, ", ".join(where.get(n.name, [])) or "-")
    out.print(table)
    out.print(f"[dim](Ray namespace {namespace} at {settings.address})[/]")


@app.command()
def render(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="kuberay", help="What to write: kuberay."),
    image: str = typer.Option(
        "ghcr.io/example/llama-orch:latest",
        "--image",
        help="The container image with llama-orch, llama-server and Ray.",
    ),
    name: Optional[str] = typer.Option(None, "--name", help="The RayCluster's name."),
    gpu_mib: int = typer.Option(
        24576, "--gpu-mib", min=1, help="The VRAM in MiB of each card of the workers."
    ),
) -> None:
    """Write a KubeRay RayCluster manifest for this home's instances (YAML on stdout)."""
    if target != "kuberay":
        raise UserError(f"Unknown render target '{target}'; the one there is: kuberay.")
    from llama_orchestrator.cluster.kuberay import manifest, to_yaml
    from llama_orchestrator.config.validate import load_all

    app = app_context(ctx)
    configs = {x.name: x.config for x in load_all(app.home) if x.config is not None}
    settings = app.engine.settings.model_dump(exclude_defaults=True, mode="json")
    try:
        from importlib.metadata import version

        ray_version = version("ray")
    except Exception:  # not installed here: the version the extra asks for
        ray_version = "2.60.0"
    docs = manifest(
        name or app.home.root.resolve().name,
        image,
        configs,
        settings,
        ray_version=ray_version,
        gpu_mib=gpu_mib,
    )
    sys.stdout.write(to_yaml(docs))
