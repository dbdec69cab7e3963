"""logs and events."""

from __future__ import annotations

import sys
import time
from typing import Optional

import typer

from llama_orchestrator.cli.context import app_context, out, say
from llama_orchestrator.engine import logs as logfiles
from llama_orchestrator.engine.status import iso
from llama_orchestrator.errors import UserError
from llama_orchestrator.store.rows import Event
from llama_orchestrator.timefmt import parse_since

__all__ = ["register"]

EVENTS_POLL = 0.25


def logs(
    ctx: typer.Context,
    name: str = typer.Argument(..., metavar="NAME"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    tail: Optional[int] = typer.Option(
        None, "--tail", "-n", min=0, metavar="N", help="Only the last N lines."
    ),
    since: Optional[str] = typer.Option(
        None, metavar="WHEN", help="Only lines since then: 10m, 2h, 1d or an ISO time."
    ),
    timestamps: bool = typer.Option(
        False, "--timestamps", "-t", help="Start each line with its wall-clock time (UTC)."
    ),
    stream: str = typer.Option("both", metavar="STREAM", help="stdout, stderr or both."),
) -> None:
    """Print an instance's llama-server output (stdout to stdout, stderr to stderr)."""
    app = app_context(ctx)
    (name,) = app.engine.resolve_names([name])
    if stream not in ("stdout", "stderr", "both"):
        raise UserError(f"--stream {stream!r} is not known.", hint="Use stdout, stderr or both.")
    start = parse_since(since, time.time()) if since else None
    row = app.engine.store.get(name)
    if row is not None and row.node is not None:  # its server runs on a cluster node
        from llama_orchestrator.daemon.client import copy_logs
        from llama_orchestrator.daemon.info import running

        copy_logs(running(app.home), name)
    streams = logfiles.STREAMS if stream == "both" else (stream,)
    log_dir = app.home.log_dir(name)
    paths = {s: logfiles.log_file(log_dir, s) for s in streams}
    sinks = {"stdout": sys.stdout, "stderr": sys.stderr}
    times = {s: logfiles.LineTimes() for s in streams}

    def text(ts: float | None, line: str) -> str:
        return f"{logfiles.wall_clock(ts)} {line}\n" if timestamps else line + "\n"

    if not follow and not any(p.exists() for p in paths.values()):
        say(
            f"'{name}' has no output yet: it has not been started (`llama-orch up {name}`).",
            to_err=True,
        )
        return
    for s, path in paths.items():
        lines = logfiles.read_lines(path, tail, start, times[s], timestamps)
        sinks[s].write("".join(text(ts, line) for ts, line in lines))
    sys.stdout.flush()
    if follow:
        try:
            for s, line in logfiles.follow(paths):
                sinks[s].write(text(times[s].time_of(line), line))
                sinks[s].flush()
        except KeyboardInterrupt:
            pass


def _event_line(e: Event) -> str:
    return f"{iso(e.ts)}  {e.instance or '-':<16} {e.kind:<10} {e.message}"


def events(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, help="Only this instance's events.", metavar="NAME"),
    since: Optional[str] = typer.Option(None, help="E.g. 10m, 2h, 1d or an ISO time."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events."),
    json_: bool = typer.Option(False, "--json", help="One JSON object a line."),
) -> None:
    """Show the state transitions and actions recorded for instances."""
    import json

    engine = app_context(ctx).engine
    if name is not None and name not in engine.upstreams():  # an upstream has events too
        (name,) = engine.resolve_names([name])
    start = parse_since(since, time.time()) if since else None

    def emit(batch: list[Event]) -> None:
        for e in batch:
            if json_:
                sys.stdout.write(json.dumps({**e.to_json(), "ts": iso(e.ts)}) + "\n")
            else:
                out.print(_event_line(e), markup=False)
        sys.stdout.flush()

    batch = engine.store.events(name, since=start)
    emit(batch)
    last = (
        batch[-1].id
        if batch
        else max((e.id for e in engine.store.events(name, limit=1)), default=0)
    )
    try:
        while follow:
            time.sleep(
                EVENTS_POLL
            )  # the store is polled: SQLite has no change feed across processes
            batch = engine.store.events(name, after_id=last)
            if batch:
                emit(batch)
                last = batch[-1].id
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    app.command()(logs)
    app.command()(events)
