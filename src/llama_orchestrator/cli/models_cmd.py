"""models pull | list | rm | inspect."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from llama_orchestrator.cli.context import app_context, err, out, print_json, say
from llama_orchestrator.errors import OrchError
from llama_orchestrator.units import human_bytes, human_count

__all__ = ["app", "BarProgress"]

app = typer.Typer(
    help="Models: pull from Hugging Face, list, remove, inspect.", no_args_is_help=True
)


class Interrupted(OrchError):
    exit_code = 130


class BarProgress:
    """A rich bar per file on stderr (bytes, rate, ETA); plain lines when
    stderr is not a terminal."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None
        self.name = ""
        self.total: int | None = None
        self.done = 0

    def start(self, name: str, total: int | None, done: int) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.close()
        self.name, self.total, self.done = name, total, done
        if not err.is_terminal:
            resumed = f", resuming at {human_bytes(done)}" if done else ""
            size = human_bytes(total) if total is not None else "unknown size"
            say(f"downloading {name} ({size}{resumed})", to_err=True)
            return
        self._bar = Progress(
            "[bold]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err.console(),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(name, total=total, completed=done)

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)

    def reset(self, done: int) -> None:
        self.done = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def pull_with_progress(home: Any, ref: str, **kw: Any) -> Any:
    """`models.pull.pull` with a bar, turning Ctrl+C into one sentence about
    the partial file (kept, resumed by the next pull)."""
    from llama_orchestrator.models.pull import pull as pull_model

    bar = BarProgress()
    try:
        return pull_model(home, ref, bar, **kw)
    except KeyboardInterrupt:
        bar.close()
        if kw.get("use_cache"):
            raise Interrupted(
                f"Interrupted; {bar.name} was being downloaded into the Hugging Face cache, "
                "which does not keep partial files: the next pull starts it again."
            ) from None
        got = f" ({human_bytes(bar.done)} of {human_bytes(bar.total)})" if bar.total else ""
        raise Interrupted(
            f"Interrupted; the partial download of {bar.name}{got} is kept, and the same "
            f"`llama-orch models pull {ref}` resumes it."
        ) from None
    finally:
        bar.close()


@app.command("pull")
def pull(
    ctx: typer.Context,
    ref: str = typer.Argument(
        ..., help="OWNER/REPO[:QUANT] or OWNER/REPO/FILE.gguf (hf:// optional).", metavar="REF"
    ),
    revision: Optional[str] = typer.Option(
        None, "--revision", help="A branch, tag or commit (default: main)."
    ),
    cache: bool = typer.Option(
        False,
        "--cache",
        help="Download into the shared Hugging Face cache (HF_HUB_CACHE) instead of <home>/models.",
    ),
    json_: bool = typer.Option(False, "--json", help="JSON output: the catalog entry."),
) -> None:
    """Download a GGUF model from Hugging Face, verify its checksum and record it."""
    app_ctx = app_context(ctx)
    done = pull_with_progress(app_ctx.home, ref, revision=revision, use_cache=cache)
    e = done.entry
    if json_:
        from dataclasses import asdict

        print_json({**asdict(e), "fetched_bytes": done.fetched, "notes": done.notes})
        return
    for note in done.notes:
        say(f"note: {note}", to_err=True)
    check = {"sha256": "sha256 verified", "git-sha1": "git checksum verified"}.get(
        e.verified or "", "no checksum on the hub"
    )
    parts = f", {len(e.files)} parts" if len(e.files) > 1 else ""
    say(f"{e.id}: {human_bytes(e.size)}{parts}, {check}")
    say(f"  {e.path}")
    say(f"use it: llama-orch init NAME --model hf://{e.id}")


@app.command("list")
def list_(
    ctx: typer.Context,
    folder: Optional[Path] = typer.Argument(
        None,
        help="List the .gguf files under this folder instead.",
        metavar="DIR",
    ),
    json_: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Pulled models (the catalog), other .gguf files in the models folder and
    those in the shared Hugging Face cache; with DIR, the .gguf files there."""
    from llama_orchestrator.models.pull import models_dir
    from llama_orchestrator.models.pull import rows as model_rows

    home = app_context(ctx).home
    rows = model_rows(home, folder)
    if json_:
        print_json(rows)
        return
    if not rows:
        where = (
            f"under {folder}"
            if folder
            else f"pulled, under {models_dir(home)} or in the Hugging Face cache"
        )
        say(f"no models {where}. Pull one: llama-orch models pull OWNER/REPO:QUANT")
        return
    out.print(_folder_table(rows, folder) if folder else _catalog_table(rows))


def _catalog_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("MODEL", "QUANT", "SIZE", "VERIFIED", "WHERE", "USED BY"):
        table.add_column(col, overflow="fold")
    for r in rows:
        name = r["id"] or r["path"]
        if r["parts"] > 1:
            name += f" ({r['parts']} parts)"
        if not r["complete"]:
            name += " [red](incomplete)[/]"
        table.add_row(
            name,
            r["quant"] or r.get("file_type") or "-",
            human_bytes(r["size_bytes"]),
            r["verified_by"] or "no",
            r["location"],
            ", ".join(r["instances"]) or "-",
        )
    return table


def _folder_table(rows: list[dict[str, Any]], root: Path) -> Any:
    """The GGUF metadata of each file under a folder."""
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("MODEL", "ARCH", "PARAMS", "QUANT", "CONTEXT", "LAYERS", "SIZE"):
        table.add_column(col, overflow="fold")
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
    return table


@app.command("rm")
def rm(
    ctx: typer.Context,
    model_id: str = typer.Argument(
        ..., help="A pulled model's ID (see `models list`).", metavar="ID"
    ),
) -> None:
    """Delete a pulled model's files and its catalog entry (refused while an instance uses it)."""
    from llama_orchestrator.models.pull import remove

    entry, notes = remove(app_context(ctx).home, model_id)
    say(f"removed {entry.id} ({human_bytes(entry.size)})")
    for note in notes:
        say(f"note: {note}", to_err=True)


@app.command("inspect")
def inspect(
    ctx: typer.Context,
    target: str = typer.Argument(
        ..., help="A .gguf file or a pulled model's ID.", metavar="PATH|ID"
    ),
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
    from llama_orchestrator.models.catalog import Catalog, catalog_path
    from llama_orchestrator.models.gguf import estimate, read_model

    path = Path(target)
    if not path.exists():
        entry = Catalog.load(catalog_path(app_context(ctx).home.root)).find(target)
        if entry is not None:
            path = Path(entry.path)
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
