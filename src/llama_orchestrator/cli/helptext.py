"""Help and usage lines as people read them: `logs [OPTIONS] NAME`, not
`{NAME}` with a `<str>` beside it (typer 0.28's rich help), and a word for
what an option takes (`--timeout SECONDS`, not `<float range>`)."""

from __future__ import annotations

import copy
from typing import Any

from typer.core import TyperArgument, TyperGroup

__all__ = ["PlainHelpGroup"]

#: what an option of this click type takes, when the option names nothing itself
_TAKES = {
    "int": "N",
    "int range": "N",
    "float": "NUMBER",
    "float range": "NUMBER",
    "path": "PATH",
    "str": "TEXT",
}


class _Argument(TyperArgument):
    def make_metavar(self, ctx: Any, *, usage: bool = False) -> str:
        var = self.metavar or (self.name or "").upper()
        if usage and not self.required:
            var = f"[{var}]"
        return var + ("..." if self.nargs != 1 else "")


def _untyped(kind: Any) -> Any:
    """A copy of an argument's type that shows no `<str>` beside its name."""
    quiet = copy.copy(kind)
    quiet.get_metavar = lambda param, ctx: ""
    return quiet


def plain(command: Any) -> None:
    """Give every parameter of `command` (and its sub-commands) a plain metavar.

    (typer vendors its own click, so its classes are told by duck typing.)"""
    for param in command.params:
        if isinstance(param, TyperArgument) and not isinstance(param, _Argument):
            param.__class__ = _Argument
            param.metavar = param.metavar or (param.name or "").upper()
            param.type = _untyped(param.type)
        elif (
            param.param_type_name == "option"
            and param.metavar is None
            and not getattr(param, "is_flag", False)
        ):
            param.metavar = _TAKES.get(param.type.name)
    for sub in (getattr(command, "commands", None) or {}).values():
        plain(sub)


class PlainHelpGroup(TyperGroup):
    """The root group: plain help for its own options and, as they are looked
    up, its commands'."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plain(self)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            plain(command)
        return command
