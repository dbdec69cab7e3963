"""init, up, down, restart, rm."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import List, Literal, Optional, Union

import typer

from llama_orchestrator.cli.context import AppContext, app_context, err, say
from llama_orchestrator.engine.results import Progress, UpResult
from llama_orchestrator.errors import OrchError, UserError
from llama_orchestrator.gpus.backends import BACKENDS

__all__ = ["register"]


def _parse_gpus(text: Optional[str]) -> Union[list[int], Literal["auto"], None]:
    if not text:
        return None
    if text == "auto":
        return "auto"
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"--gpu {text!r} is not a list of GPU indices.",
            hint="Use e.g. --gpu 0, --gpu 0,3 or --gpu auto.",
        ) from None


def init(
    ctx: typer.Context,
    name: str = typer.Argument(
        ..., help="Instance name (lowercase letters, digits, . _ -).", metavar="NAME"
    ),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        metavar="MODEL",
        help="A GGUF file, hf://OWNER/REPO[:QUANT] (pulled if missing) or a pulled model's ID.",
    ),
    port: Optional[int] = typer.Option(
        None, metavar="PORT", help="Port (default: the first free one from 8001)."
    ),
    host: Optional[str] = typer.Option(
        None, metavar="ADDRESS", help="Address llama-server listens on (default: 127.0.0.1)."
    ),
    backend: Optional[str] = typer.Option(
        None, metavar="BACKEND", help=f"One of {', '.join(BACKENDS)} (default: cpu)."
    ),
    gpu: Optional[str] = typer.Option(
        None, metavar="GPUS", help="GPU index or list (0 or 0,3), or auto."
    ),
    layers: Optional[int] = typer.Option(None, help="Layers to offload to the GPU (-ngl)."),
    ctx_size: Optional[int] = typer.Option(
        None,
        "--ctx",
        metavar="TOKENS",
        help="Context size in tokens (default: the model's, at most 4096).",
    ),
    parallel: Optional[int] = typer.Option(None, help="Parallel request slots (default: 1)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads."),
    alias: Optional[str] = typer.Option(
        None, metavar="ALIAS", help="Model name clients ask for (default: NAME)."
    ),
    tag: List[str] = typer.Option([], "--tag", metavar="TAG", help="A tag (repeatable)."),
    binary: Optional[str] = typer.Option(
        None,
        metavar="PATH",
        help="The llama-server to run, e.g. your CUDA build (default: the lookup in the docs).",
    ),
    force: bool = typer.Option(
        False, "--force", help="Overwrite an existing config (keeping what is not given)."
    ),
    extra: Optional[List[str]] = typer.Argument(None, help="More llama-server arguments after --."),
) -> None:
    """Create instances/NAME/config.json (--model is needed unless --force updates one)."""
    from llama_orchestrator.cli.models_cmd import pull_with_progress
    from llama_orchestrator.config.create import create_instance

    app = app_context(ctx)

    def locate(text: str) -> tuple[Path, list[str]]:
        from llama_orchestrator.models.pull import local_model

        return local_model(app.home, text, lambda ref: pull_with_progress(app.home, ref))

    created = create_instance(
        app.home,
        name,
        model=model,
        port=port,
        host=host,
        backend=backend,
        gpus=_parse_gpus(gpu),
        layers=layers,
        ctx=ctx_size,
        parallel=parallel,
        threads=threads,
        alias=alias,
        tags=tag,
        extra_args=extra or [],
        binary=binary,
        force=force,
        locate=locate,
    )
    say(f"{'Updated' if created.replaced else 'Created'} {created.path}")
    for note in created.notes:
        say(f"  {note}")
    if created.replaced and app.engine.is_running(name):
        say(
            f"It runs with the old config: this takes effect at the next restart "
            f"(llama-orch restart {name})."
        )
    else:
        say(f"Start it with: llama-orch up {name}")


def _log_message(line: str, width: int = 70) -> str:
    """llama.cpp's log line without its `0.01.072.502 I srv ` prefix, cut to width."""
    parts = line.split(None, 3)
    if len(parts) == 4 and parts[0].count(".") == 3 and len(parts[1]) == 1:
        line = parts[3]
    return line if len(line) <= width else line[: width - 1] + "…"


@contextmanager
def _interrupt_note(names: list[str]) -> Iterator[None]:
    """Ctrl+C while waiting stops the waiting, not the instances: say so."""
    try:
        yield
    except KeyboardInterrupt:
        say(
            f"Stopped waiting; {', '.join(names)} {'keeps' if len(names) == 1 else 'keep'} "
            "starting in the background "
            "(`llama-orch ps` shows them, `llama-orch down` stops them).",
            to_err=True,
        )
        raise


@contextmanager
def _progress() -> Iterator[Progress]:
    """A live status line on stderr while models load (nothing when piped)."""
    status = err.status("Starting…") if sys.stderr.isatty() else None

    queued: set[str] = set()  # waiting for their turn to load: counted, not shown

    def on_progress(name: str, phase: str, elapsed: float, detail: str) -> None:
        if status is None:
            return
        if phase == "queued":
            queued.add(name)
            return
        queued.discard(name)
        if phase == "healthy":
            err.print(f"[green]✔[/] {name} healthy after {elapsed:.1f}s", markup=True)
        else:
            from rich.markup import escape

            more = f" · {len(queued)} queued" if queued else ""
            status.update(
                f"{name}: {phase} ({elapsed:.0f}s){more}  [dim]{escape(_log_message(detail))}[/]"
            )

    if status is None:
        yield on_progress
        return
    with status:
        yield on_progress


def _report_up(results: list[UpResult]) -> None:
    for r in results:
        for w in r.warnings:
            say(f"warning: {w}", to_err=True)
        for n in r.notes:
            say(f"{r.name}: {n}")
        url = f"http://{r.host or '127.0.0.1'}:{r.port}"
        if r.outcome == "queued":
            place = (
                f" (load {r.load_position[0]} of {r.load_position[1]})" if r.load_position else ""
            )
            say(
                f"{r.name} queued{place}: the daemon starts it once the models before it "
                "have loaded (loads.max_concurrent)"
            )
        elif r.outcome == "waiting":
            say(f"{r.name} waits to start; the daemon tries again until it can")
        elif r.outcome == "already running":
            say(f"{r.name} is already running (pid {r.pid}) on {url}")
            if r.stale:
                say(
                    f"warning: {r.name}'s config changed since it started; "
                    f"`llama-orch restart {r.name}` applies it.",
                    to_err=True,
                )
        else:
            say(
                f"{r.name} healthy (pid {r.pid}) on {url}"
                if r.healthy
                else f"{r.name} started (pid {r.pid}) on {url}"
            )


def up(
    ctx: typer.Context,
    names: Optional[List[str]] = typer.Argument(None, help="Instances to start.", metavar="NAME"),
    all_: bool = typer.Option(False, "--all", help="Start every instance."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until /health answers 200."),
    timeout: float = typer.Option(
        300, min=0, metavar="SECONDS", help="Seconds to wait for health."
    ),
    no_daemon: bool = typer.Option(
        False, "--no-daemon", help="Start them here, unsupervised (no daemon, no restarts)."
    ),
    strict: bool = typer.Option(False, "--strict", help="Refuse to overcommit a GPU's VRAM."),
) -> None:
    """Start instances in the background, supervised by the daemon (started if needed)."""
    app = app_context(ctx)
    targets, lazy = app.engine.up_names(names or [], all_)
    for name in lazy:
        say(f"{name} is on demand: the router starts it when a request names it")
    ctl = app.control(start_daemon=True) if not no_daemon else app.unsupervised()
    if not targets:
        return  # every one is on demand: the daemon (and its router) is what they need
    try:
        with _progress() as on_progress, _interrupt_note(targets):
            results = ctl.up(
                targets, wait=wait, timeout=timeout, on_progress=on_progress, strict=strict
            )
    except OrchError:
        if app.started_daemon and not app.engine.needs_daemon():
            _stop_idle_daemon(app)
        raise
    _report_up(results)


def _stop_idle_daemon(app: AppContext) -> None:
    """A daemon this `up` started, left with nothing to do after it failed,
    would hold the router's port for nothing (and keep another home's daemon
    off it): stop it again."""
    from llama_orchestrator.daemon.main import stop

    with contextlib.suppress(OrchError):  # the up's own error is what matters
        stop(app.home, all_=False)
        say("Stopped the daemon this `up` started: nothing is left for it to run.", to_err=True)


def down(
    ctx: typer.Context,
    names: Optional[List[str]] = typer.Argument(None, help="Instances to stop.", metavar="NAME"),
    all_: bool = typer.Option(False, "--all", help="Stop every instance."),
    timeout: Optional[float] = typer.Option(
        None, min=0, metavar="SECONDS", help="Seconds before a kill (default: stop_timeout)."
    ),
) -> None:
    """Stop instances (SIGTERM, then kill the tree after the timeout)."""
    app = app_context(ctx)
    targets = app.engine.resolve_names(names or [], all_)
    t0 = time.monotonic()
    stopped = app.control().down(targets, timeout)
    for name in targets:
        say(f"{name} {'stopped' if name in stopped else 'was not running'}")
    if stopped and sys.stderr.isatty():
        say(f"({time.monotonic() - t0:.1f}s)", to_err=True)


def restart(
    ctx: typer.Context,
    names: List[str] = typer.Argument(
        ..., help="Instances to restart (with --rolling: an alias).", metavar="NAME"
    ),
    timeout: float = typer.Option(
        300, min=0, metavar="SECONDS", help="Seconds to wait for health."
    ),
    rolling: bool = typer.Option(
        False, "--rolling", help="One replica at a time, drained first: no failed requests."
    ),
) -> None:
    """Stop and start instances again."""
    app = app_context(ctx)
    if rolling:
        from llama_orchestrator.config.validate import replicas_of

        targets = [n for alias in names for n in replicas_of(app.home, alias)]
    else:
        targets = app.engine.resolve_names(names)
    with _progress() as on_progress:
        results = app.control().restart(
            targets, timeout=timeout, on_progress=on_progress, rolling=rolling
        )
    _report_up(results)


def rm(
    ctx: typer.Context,
    name: str = typer.Argument(..., metavar="NAME"),
    force: bool = typer.Option(False, "--force", "-f", help="Stop it first if it runs."),
) -> None:
    """Remove an instance: its config, logs and state."""
    app = app_context(ctx)
    (target,) = app.engine.resolve_names([name])
    app.control().rm(target, force)
    say(f"{target} removed")


def register(app: typer.Typer) -> None:
    app.command()(init)
    for cmd in (up, down, restart, rm):
        app.command()(cmd)
