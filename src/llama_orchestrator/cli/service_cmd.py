"""service install | uninstall | status."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import typer

from llama_orchestrator.cli.context import app_context, print_json, say

if TYPE_CHECKING:
    from llama_orchestrator.service.manage import Host
    from llama_orchestrator.service.spec import Plan

__all__ = ["app"]

app = typer.Typer(
    help="Run the daemon at boot: systemd, NSSM or Task Scheduler.", no_args_is_help=True
)

_MANAGER = typer.Option(
    None, "--manager", help="systemd, nssm or schtasks (default: the platform's)."
)
_USER = typer.Option(False, "--user", help="A per-user service (systemd --user, a logon task).")
_NAME = typer.Option("llama-orch", "--name", help="Unit, service or task name.")
_DRY = typer.Option(False, "--dry-run", help="Print every file and command; change nothing.")


@app.command()
def install(
    ctx: typer.Context,
    user: bool = _USER,
    manager: Optional[str] = _MANAGER,
    name: str = _NAME,
    dry_run: bool = _DRY,
    force: bool = typer.Option(False, "--force", help="Replace an installed service."),
) -> None:
    """Install and start the daemon of this home as a service."""
    from llama_orchestrator.service import manage

    home, host = app_context(ctx).home, manage.Host.detect()
    t, plan = manage.install(
        home, manager=manager, name=name, user=user, force=force, dry_run=dry_run, host=host
    )
    _carry_out(plan, dry_run, host)
    if not dry_run:
        say(f"Installed and started '{name}' ({t.manager}); `llama-orch service status` shows it.")


@app.command()
def uninstall(
    ctx: typer.Context,
    user: bool = _USER,
    manager: Optional[str] = _MANAGER,
    name: str = _NAME,
    dry_run: bool = _DRY,
) -> None:
    """Stop and remove the service (instances stop with it)."""
    from llama_orchestrator.service import manage

    home, host = app_context(ctx).home, manage.Host.detect()
    t, plan = manage.uninstall(
        home, manager=manager, name=name, user=user, dry_run=dry_run, host=host
    )
    _carry_out(plan, dry_run, host)
    if not dry_run:
        say(f"Removed '{name}' ({t.manager}).")


@app.command()
def status(
    ctx: typer.Context,
    user: bool = _USER,
    manager: Optional[str] = _MANAGER,
    name: str = _NAME,
    json_: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Installed? enabled? active? and the manager's own status lines."""
    from llama_orchestrator.service import manage

    data = manage.status(
        app_context(ctx).home, manager=manager, name=name, user=user, host=manage.Host.detect()
    )
    if json_:
        print_json(data)
        return
    say(
        f"{name} ({data['manager']}): {'installed' if data['installed'] else 'not installed'}"
        + (f" at {data['path']}" if data["path"] and data["installed"] else "")
    )
    if data["enabled"] is not None:
        say(f"  enabled: {data['enabled']}")
    if data["active"] is not None:
        say(f"  active:  {data['active']}")
    for line in data["details"]:
        say(f"  | {line}")


def _carry_out(plan: Plan, dry_run: bool, host: Host) -> None:
    from llama_orchestrator.service import manage

    if dry_run:
        for line in manage.describe_plan(plan):
            say(line)
    else:
        manage.execute(plan, host, say)
    for note in plan.notes:
        say(f"note: {note}")
