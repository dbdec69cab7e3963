"""One exception tree for llama-orch, with the CLI exit code of each class.

    OrchError                 exit 1: an operation failed
    ├── UserError             exit 2: bad input the user can fix
    │   ├── ConfigError       an instance config is invalid (carries every problem)
    │   ├── UnknownInstance   no such instance in this home
    │   ├── PortConflict      the port is owned by another instance or process
    │   └── BinaryNotFound    no llama-server anywhere we looked
    ├── StateError            the state database cannot be read or written
    │   └── DiskFull          no space left where we must write (names the path)
    └── StartFailed           an instance died or timed out while starting

Foreign exceptions (OSError, sqlite3, pydantic) are translated where
they enter, so the CLI's single handler only ever sees these.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "OrchError",
    "UserError",
    "ConfigError",
    "Problem",
    "UnknownInstance",
    "PortConflict",
    "BinaryNotFound",
    "StateError",
    "DiskFull",
    "StartFailed",
    "NotYet",
]


class OrchError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class UserError(OrchError):
    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one config file: `file: field: message`."""

    file: str
    field: str
    message: str
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else self.file
        return f"{where}: {self.message}"


class ConfigError(UserError):
    def __init__(self, problems: list[Problem], *, hint: str | None = None) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems), hint=hint)


class UnknownRun(UserError):
    """A plan run id this home does not have."""

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"No plan run '{run_id}' in this home.", hint="`llama-orch plan list` shows them."
        )


class UnknownInstance(UserError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        choices = ", ".join(known) if known else "none yet"
        super().__init__(
            f"No instance named '{name}' in this home (known: {choices}).",
            hint=f"Create it with `llama-orch init {name} --model PATH`.",
        )


class PortConflict(UserError):
    pass


class BinaryNotFound(UserError):
    pass


class StateError(OrchError):
    pass


class DiskFull(StateError):
    """No space left on the disk we must write to; the message names the
    path and the space left. Nobody's fault but the disk's: the daemon keeps
    its state in memory and tries again (nothing counts as a crash)."""


class StartFailed(OrchError):
    pass


class NotYet(OrchError):
    """A start that cannot happen now and will once something outside us
    changes (a lost node back, a card free on one): not the server's fault,
    so the daemon tries again every `retry_s` without counting a crash."""

    def __init__(self, message: str, hint: str | None = None, retry_s: float = 2.0) -> None:
        super().__init__(message, hint=hint)
        self.retry_s = retry_s
