"""ps, describe, health."""

from __future__ import annotations

import sys
import time
from typing import Any

import typer

from llama_orchestrator.cli.context import app_context, out, print_json, say
from llama_orchestrator.engine.results import exit_text
from llama_orchestrator.engine.status import InstanceStatus, with_loads
from llama_orchestrator.present import (
    STATE_STYLES,
    ago,
    backend_label,
    build_label,
    columns,
    on_demand_line,
    state_label,
)
from llama_orchestrator.timefmt import human_duration
from llama_orchestrator.units import human_bytes, human_count

__all__ = ["register", "ps_table"]


PS_COLUMNS = ["NAME", "STATE", "PID", "PORT", "ALIAS", "BACKEND", "RESTARTS", "UPTIME", "MODEL"]


def ps_table(
    rows: list[InstanceStatus], color: bool = False, now: float | None = None, hosts: bool = False
) -> str:
    """The `ps` table as plain text (ANSI colours for the state when `color`);
    with a LAST USED column when any instance is on demand, and HOST first
    when `hosts` (`ps --all-hosts`: each row's `machine`, "local" for this one);
    NODE after the state in a cluster home (where each runs, or is pinned)."""
    on_demand = any(r.get("on_demand") for r in rows)
    nodes = any(r.get("node") for r in rows)
    now = time.time() if now is None else now
    cells = []
    for r in rows:
        state = state_label(r) + (" (bad config)" if r.get("config_error") else "")
        state += " (config changed)" if r.get("config_changed") else ""
        cells.append(
            [
                *([str(r.get("machine") or "local")] if hosts else []),
                r["name"],
                state,
                *([str(r.get("node") or "-")] if nodes else []),
                str(r["pid"] or "-"),
                str(r["port"] or "-"),
                r["alias"] or "-",
                backend_label(r),
                str(r["restarts"]),
                human_duration(r["uptime_s"]),
                *([ago(r["last_used_at"], now)] if on_demand else []),
                (r["model_path"] or "-").rsplit("/", 1)[-1],
            ]
        )
    headers = (
        ["HOST"] * hosts
        + PS_COLUMNS[:2]
        + ["NODE"] * nodes
        + PS_COLUMNS[2:-1]
        + ["LAST USED"] * on_demand
        + PS_COLUMNS[-1:]
    )
    styles = [STATE_STYLES.get(r["state"]) for r in rows]
    return columns(headers, cells, styles, color, state_at=1 + hosts)


def ps(
    ctx: typer.Context,
    json_: bool = typer.Option(False, "--json", help="JSON output."),
    all_hosts: bool = typer.Option(
        False,
        "--all-hosts",
        help="Also the instances of every peer in llama-orch.json, with a HOST column.",
    ),
) -> None:
    """List instances and their state."""
    app = app_context(ctx)
    seen = app.control().status()  # the daemon's view when one runs
    rows = seen.instances
    if all_hosts:
        _ps_all_hosts(app, rows, json_)
        _warn(seen.warnings)
        return
    if json_:
        from llama_orchestrator.cli import context

        print_json([{**r, "machine": context.MACHINE} for r in rows])
        _warn(seen.warnings)
        return
    from llama_orchestrator.daemon.info import running
    from llama_orchestrator.home import PER_USER

    if app.home_source == PER_USER:
        say(
            f"(home: {app.home.root}, the per-user one: no instances/ folder here or above)",
            to_err=True,
        )
    if not rows:
        say("No instances yet. Create one with: llama-orch init NAME --model PATH")
        return
    say(ps_table(rows, color=sys.stdout.isatty()))
    if changed := [r["name"] for r in rows if r.get("config_changed")]:
        say(
            "* config changed: the process runs with the config it started with; "
            f"`llama-orch restart {' '.join(changed)}` applies the new one"
        )
    info = running(app.home)
    if any(r["pid"] and not r["supervised"] for r in rows):
        if info is None:
            say("* unsupervised: no daemon runs, so nothing restarts it if it dies")
        else:
            say(
                "* unsupervised: started with --no-daemon, so the daemon does not restart it; "
                "`up` it again (without --no-daemon) and the daemon takes it over"
            )
    if info is not None and info.router_url:
        say(f"router: {info.router_url}/v1 (OpenAI-compatible; model = an alias or tags:TAG)")
    elif info is not None and info.router_error:
        say(f"warning: no router: {info.router_error}", to_err=True)
    _warn(seen.warnings)


def _ps_all_hosts(app: Any, rows: list[InstanceStatus], json_: bool) -> None:
    """`ps --all-hosts`: this machine's rows and every peer's (`fleet`)."""
    from llama_orchestrator.hosts import fleet

    seen = fleet.look(app.home, rows)
    if json_:
        print_json(seen.rows)
    elif seen.rows:
        say(ps_table(seen.rows, color=sys.stdout.isatty(), hosts=True))  # type: ignore[arg-type]
    else:
        say("No instances on this machine or its peers.")
    for name, why in seen.unreached.items():
        say(f"warning: peer {name}: {why}; its instances are not listed", to_err=True)
    if not seen.peers:
        say(
            'note: no peers in llama-orch.json ("peers": [{"name": ..., "url": ...}]); '
            "this machine's instances only",
            to_err=True,
        )


def _warn(warnings: list[str]) -> None:
    """What the status view warns of: hot or missing cards that instances are
    pinned to, a full disk the daemon supervises through."""
    for w in warnings:
        say(f"warning: {w}", to_err=True)


def describe(
    ctx: typer.Context,
    name: str = typer.Argument(..., metavar="NAME"),
    json_: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Everything about one instance: config, command, state, last exit, events."""
    engine = app_context(ctx).engine
    from llama_orchestrator.engine import views

    if name in engine.upstreams():
        _describe_upstream(
            views.describe_upstream(engine, name, app_context(ctx).control().status().instances),
            json_,
        )
        return
    (name,) = engine.resolve_names([name])
    d = views.describe(engine, name)
    with_loads([d], app_context(ctx).control().activity().loads)
    if json_:
        print_json(d)
        return
    state_style = STATE_STYLES.get(d["state"], "none")
    out.print(
        f"[bold]{d['name']}[/]  [{state_style}]{state_label(d)}[/]  (desired: {d['desired']})"
    )
    for key in (
        "pid",
        "host",
        "port",
        "alias",
        "model_path",
        "backend",
        "gpu_devices",
        "restarts",
        "started_at",
        "uptime_s",
        "exit_code",
        "supervised",
        "config_path",
    ):
        value = d.get(key)
        out.print(f"  {key:<12} {'-' if value is None else value}", markup=False)
    if d.get("config_error"):
        out.print(f"  [red]bad config:[/] {d['config_error']}")
    if d.get("config_changed"):
        out.print(
            f"  [yellow]config changed[/] since it started (host and port above are the "
            f"running ones); `llama-orch restart {d['name']}` applies it"
        )
    od = (d.get("config") or {}).get("on_demand") or {}
    if line := on_demand_line(d, od.get("idle_ttl"), time.time()):
        out.print(f"  on demand    {line}", markup=False)
    if build := d.get("build"):
        out.print(f"  build        {build_label(build)}", markup=False)
    if d.get("command"):
        out.print("  command      " + " ".join(d["command"]), markup=False)
        for k, v in d.get("env", {}).items():
            out.print(f"  env          {k}={v}", markup=False)
    if d.get("command_error"):
        out.print(f"  [red]cannot start:[/] {d['command_error']}")
    last = d.get("last_exit")
    if last:
        # ISO 8601 already (the status view converts it, as every other time)
        out.print(f"  last exit    {exit_text(last)} at {last.get('at') or '-'}", markup=False)
        for line in last.get("stderr_tail", [])[-10:]:
            out.print(f"    | {line}", markup=False)
    m = d.get("model")
    if m:
        line = (
            f"{m['architecture']} {human_count(m['parameters'])} {m['file_type']}, "
            f"{m['layers']} layers, context {m['context_length']}"
        )
        if d.get("backend") != "cpu":
            line += f"; needs ~{human_bytes(m['estimate_gpu_bytes'])} on the GPU(s)"
        out.print(f"  model        {line}", markup=False)
    for g in d.get("gpus", []):
        if g.get("missing"):
            out.print(f"  [red]gpu {g['index']}      not reported by the driver[/]")
        else:
            out.print(
                f"  gpu {g['index']:<8} {g['name']}: {_known(g['memory_used_mib'])}/"
                f"{g['memory_total_mib']} MiB, {_known(g['temperature_c'])}°C, "
                f"{_known(g['utilization_pct'])}% busy",
                markup=False,
            )
    out.print(f"  logs         {d['logs']['stderr']}", markup=False)
    if d["events"]:
        out.print("  events:")
        for e in d["events"]:
            out.print(f"    {e['ts']}  {e['kind']:<10} {e['message']}", markup=False)


def _describe_upstream(d: dict[str, Any], json_: bool) -> None:
    if json_:
        print_json(d)
        return
    u, up = d["config"]["upstream"], d["upstream"] or {}
    out.print(
        f"[bold]{d['name']}[/]  [{STATE_STYLES.get(d['state'], 'none')}]{d['state']}[/]  (external upstream)"
    )
    key = f"${u['api_key_env']}" if u.get("api_key_env") else u.get("api_key_file") or "none"
    price = u.get("price") or {}
    lines = {
        "url": u["url"],
        "alias": d["alias"],
        "model": d["model_path"],
        "key from": key,
        "limits": f"{u.get('max_concurrent')} at once, "
        + (
            f"{u['requests_per_minute']:g} a minute"
            if u.get("requests_per_minute")
            else "no rate limit"
        ),
        "price": f"{price.get('input_per_mtok', 0):g} in, {price.get('output_per_mtok', 0):g} out per million tokens",
        "budget": f"{u['budget']['per_day']:g} a day" if u.get("budget") else "none",
        "last 24h": f"{d['last_24h']['requests']} requests, {d['last_24h']['tokens_in']} tokens in, "
        f"{d['last_24h']['tokens_out']} out, cost {d['last_24h']['cost']:.4f}",
        "config_path": d["config_path"],
    }
    for k, v in lines.items():
        out.print(f"  {k:<12} {v}", markup=False)
    if up.get("error"):
        out.print(f"  [red]not answering:[/] {up['error']}")
    if d["events"]:
        out.print("  events:")
        for e in d["events"]:
            out.print(f"    {e['ts']}  {e['kind']:<10} {e['message']}", markup=False)


def health(
    ctx: typer.Context,
    name: str = typer.Argument(..., metavar="NAME"),
    json_: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Probe /health once; exit 0 only if healthy."""
    engine = app_context(ctx).engine
    (name,) = engine.resolve_names([name])
    from llama_orchestrator.engine import views

    p = views.probe(engine, name)
    if json_:
        print_json({"name": name, **p.to_json()})
    else:
        detail = f"HTTP {p.http_status}" if p.http_status else (p.error or "")
        out.print(f"{name}: {p.status} ({detail}, {p.latency_ms:.1f} ms)", markup=False)
    raise typer.Exit(0 if p.ok else 1)


def register(app: typer.Typer) -> None:
    for cmd in (ps, describe, health):
        app.command()(cmd)


def _known(value: object) -> object:
    """A reading, or "?" where the card's source does not give it."""
    return "?" if value is None else value
