"""What every command gets: the home and a lazily built engine."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import typer

from llama_orchestrator.home import Home

if TYPE_CHECKING:
    from llama_orchestrator.daemon import Control
    from llama_orchestrator.daemon.info import DaemonInfo
    from llama_orchestrator.engine.lifecycle import Engine
    from llama_orchestrator.errors import OrchError

__all__ = ["AppContext", "app_context", "out", "err", "say", "print_json"]


class _LazyConsole:
    """A rich Console built on first use: importing rich costs ~60 ms, and
    commands that print a plain line never need it."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Any = None

    def console(self) -> Any:
        """The rich Console itself (for rich parts that take one, e.g. Progress)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr, highlight=False, soft_wrap=True)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console(), name)


#: the machine's name when another machine's `--host` runs this command here
#: (`system remote`): `ps --json` says it as `machine`
MACHINE: str | None = None

out: Any = _LazyConsole(stderr=False)
err: Any = _LazyConsole(stderr=True)


def say(text: str, *, to_err: bool = False) -> None:
    """Print one plain line (no rich import)."""
    (sys.stderr if to_err else sys.stdout).write(text + "\n")


@dataclass
class AppContext:
    found_home: Home
    debug: bool = False
    #: how the home was found (home.FROM_FLAG, FROM_ENV, FROM_CWD, PER_USER)
    home_source: str = "--home"
    #: what is wrong with the home named (a file, a folder that is not there):
    #: raised when a command first uses it, so that `--help` always works
    home_problem: OrchError | None = None
    #: a command that only looks (`ps`, `logs` ...): a typo in llama-orch.json
    #: is a warning there, not a refusal
    read_only: bool = False
    #: this command started the home's daemon (`control(start_daemon=True)`)
    started_daemon: bool = False
    _engine: Engine | None = field(default=None, repr=False)

    @property
    def home(self) -> Home:
        if self.home_problem is not None:
            raise self.home_problem
        return self.found_home

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from llama_orchestrator.engine.lifecycle import Engine

            self._engine = Engine(self.home, lenient_settings=self.read_only)
        return self._engine

    def control(
        self,
        start_daemon: bool = False,
        says: str = "Started the llama-orch daemon (pid {pid}); it supervises what `up` starts.",
    ) -> Control:
        """Where up/down/restart/rm and the plan verbs go: the home's daemon
        when it runs (started first with `start_daemon`, which `says` so),
        else the engine (instances run unsupervised; plans are refused)."""
        from llama_orchestrator.daemon import control

        def started(info: DaemonInfo) -> None:
            self.started_daemon = True
            say(says.format(pid=info.pid), to_err=True)
            if info.router_error:
                say(f"warning: no router: {info.router_error}", to_err=True)

        # a cluster home's servers run on its nodes, which only its daemon reaches:
        # what changes them starts it (what only looks reads the state as recorded)
        act = start_daemon or (not self.read_only and self.home.on_cluster())
        return control(self.engine, act, started)

    def unsupervised(self) -> Control:
        """up/down/restart/rm done here, with no daemon (`up --no-daemon`)."""
        from llama_orchestrator.engine.unsupervised import Unsupervised

        if self.home.on_cluster():
            from llama_orchestrator.errors import UserError

            raise UserError(
                "This home runs its instances on a Ray cluster, which only its daemon reaches, "
                "so --no-daemon cannot start them.",
                hint="Leave out --no-daemon.",
            )
        return Unsupervised(self.engine)

    def close(self) -> None:
        if self._engine is not None:
            # said at the end: the settings are read only if the command needed
            # them (pydantic's import is ~60 ms of a `ps` the daemon answers)
            for problem in self._engine.settings_problems:
                say(f"warning: {problem} (left out here; up and the daemon refuse it)", to_err=True)
            self._engine.close()


def app_context(ctx: typer.Context) -> AppContext:
    obj = ctx.find_root().obj
    assert isinstance(obj, AppContext)
    return obj


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
