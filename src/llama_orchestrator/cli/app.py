"""The `llama-orch` command: root options, sub-commands, one error handler."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from llama_orchestrator import __version__
from llama_orchestrator.cli import (
    cluster_cmd,
    config_cmd,
    context_cmd,
    daemon_cmd,
    dashboard_cmd,
    demo_cmd,
    gpus_cmd,
    inspect_cmd,
    lifecycle_cmd,
    logs_cmd,
    models_cmd,
    plan_cmd,
    service_cmd,
    system_cmd,
    usage_cmd,
)
from llama_orchestrator.cli.context import AppContext, err
from llama_orchestrator.cli.helptext import PlainHelpGroup
from llama_orchestrator.errors import ConfigError, OrchError, UserError
from llama_orchestrator.home import find_home, require_home

if TYPE_CHECKING:
    from llama_orchestrator.hosts.ssh import SshTarget

__all__ = ["app", "main"]

app = typer.Typer(
    name="llama-orch",
    cls=PlainHelpGroup,
    help="A Docker-style process supervisor for llama.cpp's llama-server.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


#: the commands that may be given a home that does not exist yet
_MAKE_A_HOME = {"init", "demo"}
#: the commands that only look: a typo in llama-orch.json is a warning there
_READ_ONLY = {"ps", "describe", "health", "logs", "events", "gpus", "usage", "dashboard"}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llama-orch {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(
        None,
        "--home",
        envvar="LLAMA_ORCH_HOME",
        metavar="FOLDER",
        help="The home folder (default: nearest with instances/).",
    ),
    host: Optional[str] = typer.Option(
        None,
        "--host",
        envvar="LLAMA_ORCH_HOST",
        metavar="URL",
        help="Run on another machine: ssh://USER@HOST:PORT/HOME (user, port and home optional), or a context's name.",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    problem = None
    if home is not None:  # a typo in --home must not read (or create) an empty home
        try:
            require_home(home, may_create=ctx.invoked_subcommand in _MAKE_A_HOME)
        except UserError as exc:  # said when a command uses the home: help needs none
            problem = exc
    found, source = find_home(home)
    app_ctx = AppContext(
        found,
        debug,
        home_source=source,
        home_problem=problem,
        read_only=ctx.invoked_subcommand in _READ_ONLY,
    )
    ctx.obj = app_ctx
    ctx.call_on_close(app_ctx.close)


lifecycle_cmd.register(app)
inspect_cmd.register(app)
logs_cmd.register(app)
gpus_cmd.register(app)
app.add_typer(config_cmd.app, name="config")
app.add_typer(daemon_cmd.app, name="daemon")
app.add_typer(service_cmd.app, name="service")
app.add_typer(plan_cmd.app, name="plan")
app.add_typer(models_cmd.app, name="models")
app.add_typer(context_cmd.app, name="context")
app.add_typer(system_cmd.app, name="system")
app.add_typer(cluster_cmd.app, name="cluster")
app.command("demo")(demo_cmd.demo)
app.command("dashboard")(dashboard_cmd.dashboard)
app.command("usage")(usage_cmd.usage)


def _report(exc: OrchError) -> None:
    if isinstance(exc, ConfigError):
        n = len(exc.problems)
        err.print(f"[red]error:[/] {n} problem{'s' if n != 1 else ''} in the config:", markup=True)
        for p in exc.problems:
            err.print(f"  {p}", markup=False)
        if exc.hint:
            err.print(exc.hint, markup=False)
        return
    err.print("[red]error:[/] ", end="", markup=True)
    err.print(str(exc), markup=False)


def _elsewhere(args: list[str]) -> SshTarget | None:
    """The machine the command runs on when it is not this one (`--host`,
    $LLAMA_ORCH_HOST, a context); None for this one, for help and --version,
    and for the commands about this machine (`context`, `system`)."""
    from llama_orchestrator.hosts import ssh

    host, rest, command = ssh.split_root_args(args)
    root_options = set(rest[: rest.index(command)]) if command else set()
    if command is None or command in ssh.LOCAL_ONLY or {"--version", "-h", "--help"} & root_options:
        return None
    from llama_orchestrator.hosts.contexts import choose

    return choose(host)


def _far_end(payload: str) -> list[str]:
    """The command line that another machine's `--host ssh://…` sent
    (`llama-orch system remote PAYLOAD`), to run here if its version is ours."""
    from llama_orchestrator.cli import context
    from llama_orchestrator.hosts.ssh import MARKER, decode_payload, version_mismatch

    if not sys.stderr.isatty():  # over ssh -T: what follows on stderr is ours, not ssh's
        sys.stderr.write(f"{MARKER}{__version__}\n")
        sys.stderr.flush()
        from llama_orchestrator import platform

        # no terminal whose close ends us: the client's going away must (`logs -f`)
        with contextlib.suppress(OSError, ValueError):  # no file under us: nobody to watch
            platform.interrupt_on_hangup(sys.stdout.fileno())
    theirs, argv, machine = decode_payload(payload)
    if problem := version_mismatch(theirs, __version__, machine):
        raise UserError(problem)
    context.MACHINE = machine or None
    return argv


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command line on the machine `--host` names (this
    one by default), and turn every failure into one clear message.

    Typer (in standalone mode) reports usage errors itself, exit 2; our own
    errors and anything unexpected arrive here."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        here = args[:2] == ["system", "remote"]  # sent by another machine: run it here
        if here:
            args = _far_end(args[2] if len(args) == 3 else "")  # one word, or none of ours
            debug = "--debug" in args
        if not here and (target := _elsewhere(args)) is not None:
            from llama_orchestrator.hosts import ssh

            sys.exit(ssh.run(target, ssh.split_root_args(args)[1]))
        app(args=args, prog_name="llama-orch")
    except OrchError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        _report(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug of ours: say so, without a wall of traceback
        if debug:
            import traceback

            traceback.print_exc()
        else:
            err.print(
                f"[red]internal error:[/] {type(exc).__name__}: {exc}. "
                "Run again with --debug for the traceback, and please report it.",
                markup=True,
            )
        sys.exit(1)
