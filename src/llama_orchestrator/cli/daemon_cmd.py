"""daemon start | stop | status."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import typer

from llama_orchestrator.cli.context import app_context, print_json, say
from llama_orchestrator.present import peer_line
from llama_orchestrator.timefmt import human_duration

__all__ = ["app"]

app = typer.Typer(
    help="The supervisor daemon: health checks, restarts, control API.", no_args_is_help=True
)


@app.command()
def start(
    ctx: typer.Context,
    foreground: bool = typer.Option(
        False, "--foreground", help="Run in this process (for systemd, NSSM, or to watch it)."
    ),
    stop_instances: bool = typer.Option(
        False,
        "--stop-instances",
        help="With --foreground: SIGTERM/Ctrl+C stops the instances first (as services do).",
    ),
    reset_state: bool = typer.Option(
        False,
        "--reset-state",
        help="Keep the state database aside (state.sqlite.corrupt-<time>) and start a fresh one.",
    ),
) -> None:
    """Start the daemon of this home (one per home)."""
    from llama_orchestrator.daemon.main import (
        DAEMON_ENV,
        AlreadyRunning,
        exit_now,
        reset_state_aside,
        run_foreground,
        start_background,
    )

    home = app_context(ctx).home
    if reset_state:
        kept = reset_state_aside(home)
        say(
            f"Kept the old state database as {kept}; starting with a fresh one."
            if kept
            else "There was no state database; starting with a fresh one."
        )
    if foreground:
        try:
            run_foreground(home, stop_instances)
        except AlreadyRunning as exc:
            pid = f" (pid {exc.info.pid})" if exc.info else ""
            say(f"A llama-orch daemon is already running for {home.root}{pid}.")
            return
        if os.environ.get(DAEMON_ENV) == "1":
            # a daemon `up` started, whose process has nothing else to do: all is
            # closed and written, so the ~0.2 s of tearing down the interpreter
            # (fastapi, pydantic, uvicorn) would only delay whoever waits for it
            exit_now()
        return
    started = start_background(home)
    if started.new:
        say(f"Started the llama-orch daemon (pid {started.info.pid}) at {started.info.address}")
    else:
        say(f"A llama-orch daemon is already running for {home.root} (pid {started.info.pid}).")


@app.command()
def stop(
    ctx: typer.Context,
    all_: bool = typer.Option(False, "--all", help="Stop every instance first."),
) -> None:
    """Stop the daemon; instances keep running (unsupervised) unless --all."""
    from llama_orchestrator.daemon.main import stop as stop_daemon

    home = app_context(ctx).home
    info = stop_daemon(home, all_)
    if info is None:
        say(f"No llama-orch daemon is running for {home.root}.")
    elif all_:
        say(f"Stopped the llama-orch daemon (pid {info.pid}) and its instances.")
    else:
        say(f"Stopped the llama-orch daemon (pid {info.pid}); instances keep running.")


@app.command()
def status(
    ctx: typer.Context, json_: bool = typer.Option(False, "--json", help="JSON output.")
) -> None:
    """Whether the daemon runs: pid, uptime, socket, supervised instances."""
    from llama_orchestrator.daemon.client import DaemonClient
    from llama_orchestrator.daemon.info import running

    home = app_context(ctx).home
    info = running(home)
    data: dict[str, Any]
    if info is None:
        data = {
            "running": False,
            "pid": None,
            "uptime_s": None,
            "home": str(home.root),
            "socket": None,
            "router_url": None,
            "router_error": None,
            "instances": [],
            "peers": {},
        }
    else:
        data = DaemonClient(info, timeout=10).call("GET", "/v1/status")
    if json_:
        print_json(data)
        return
    if not data["running"]:
        say(
            f"No llama-orch daemon is running for {home.root}. Start one with `llama-orch daemon start`."
        )
        return
    names = ", ".join(data["instances"]) or "none"
    say(
        f"running      pid {data['pid']}, up {human_duration(data['uptime_s'])}"
        f" (since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(time.time() - data['uptime_s']))})"
    )
    say(f"home         {data['home']}")
    say(f"control API  {data['socket']}")
    say(
        f"router       {data['router_url'] or 'not listening: ' + (data.get('router_error') or 'unknown')}"
    )
    say(f"supervises   {names}")
    for name, peer in (data.get("peers") or {}).items():
        say(f"peer         {peer_line(name, peer)}")
    if unsaved := data.get("state_unsaved"):
        say(f"state        {unsaved['changes']} changes kept in memory: {unsaved['error']}")
    say(f"log          {home.daemon_log}")
    sys.stdout.flush()
