"""The daemon's control protocol: what the CLI and the daemon say to each
other over `state/daemon.sock`, typed on both sides.

Requests and replies are plain dataclasses: the client builds and reads them
without importing pydantic (a CLI command pays for every import); the server
validates the same classes (`__pydantic_config__` forbids unknown fields,
`__post_init__` checks the values).

Errors cross as `{"error": {code, message, hint, exit_code, problems?}}`
with a stable `ErrorCode`, mapped both ways to the exception tree of
`errors.py`, so a command through the daemon fails exactly as it would have
without it.

`Control` is what commands act on: the local `Engine` (instances run
unsupervised) and the daemon's client (`daemon.client.Supervised`) both
implement it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from llama_orchestrator.engine.results import Progress, UpResult
from llama_orchestrator.engine.status import Activity, StatusReply
from llama_orchestrator.errors import (
    BinaryNotFound,
    ConfigError,
    OrchError,
    PortConflict,
    Problem,
    StartFailed,
    StateError,
    UnknownInstance,
    UnknownRun,
    UserError,
)

__all__ = [
    "ErrorCode",
    "Control",
    "UpRequest",
    "DownRequest",
    "RestartRequest",
    "RmRequest",
    "ShutdownRequest",
    "PlanRequest",
    "UpReply",
    "DownReply",
    "RmReply",
    "ShutdownReply",
    "PlanReply",
    "CancelReply",
    "StatusReply",
    "RetryReply",
    "error_to_json",
    "error_from_json",
    "http_status",
]

_STRICT = {"extra": "forbid"}


class ErrorCode(str, Enum):
    """Why a control request failed: stable across versions (never a class name)."""

    BAD_REQUEST = "bad_request"  # malformed body, unknown field, wrong type
    BAD_HOST = "bad_host"  # the Host header is not ours (DNS rebinding)
    UNAUTHORIZED = "unauthorized"  # no or a wrong daemon token
    TOO_LARGE = "too_large"
    NO_ROUTE = "no_route"
    UNKNOWN_INSTANCE = "unknown_instance"
    UNKNOWN_RUN = "unknown_run"  # a plan run id this home does not have
    INVALID_CONFIG = "invalid_config"
    PORT_CONFLICT = "port_conflict"
    NO_BINARY = "no_binary"
    BAD_INPUT = "bad_input"  # any other UserError
    START_FAILED = "start_failed"
    STATE_ERROR = "state_error"
    FAILED = "failed"  # any other OrchError

    @property
    def exit_code(self) -> int:
        return 1 if self in _EXIT_1 else 2


_EXIT_1 = {ErrorCode.START_FAILED, ErrorCode.STATE_ERROR, ErrorCode.FAILED}

#: most specific first: the first class an exception is an instance of gives its code
_CODES: list[tuple[type[OrchError], ErrorCode]] = [
    (UnknownInstance, ErrorCode.UNKNOWN_INSTANCE),
    (UnknownRun, ErrorCode.UNKNOWN_RUN),
    (ConfigError, ErrorCode.INVALID_CONFIG),
    (PortConflict, ErrorCode.PORT_CONFLICT),
    (BinaryNotFound, ErrorCode.NO_BINARY),
    (UserError, ErrorCode.BAD_INPUT),
    (StartFailed, ErrorCode.START_FAILED),
    (StateError, ErrorCode.STATE_ERROR),
    (OrchError, ErrorCode.FAILED),
]

_HTTP = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.BAD_HOST: 421,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.NO_ROUTE: 404,
    ErrorCode.UNKNOWN_INSTANCE: 404,
    ErrorCode.UNKNOWN_RUN: 404,
}


def code_of(exc: OrchError) -> ErrorCode:
    return next(code for cls, code in _CODES if isinstance(exc, cls))


def http_status(code: ErrorCode) -> int:
    return _HTTP.get(code, 400 if code.exit_code == 2 else 500)


def error_to_json(exc: OrchError) -> dict[str, Any]:
    code = code_of(exc)
    out: dict[str, Any] = {
        "code": code.value,
        "message": exc.message,
        "hint": exc.hint,
        "exit_code": exc.exit_code,
    }
    if isinstance(exc, ConfigError):
        out["problems"] = [asdict(p) for p in exc.problems]
    return out


def error_from_json(data: dict[str, Any]) -> OrchError:
    """The daemon's error as the exception the local engine would have raised."""
    message, hint = str(data.get("message", "")), data.get("hint")
    try:
        code = ErrorCode(data.get("code"))
    except ValueError:  # a newer daemon's code: its exit code still says which side
        code = ErrorCode.BAD_INPUT if data.get("exit_code") == 2 else ErrorCode.FAILED
    if code == ErrorCode.INVALID_CONFIG and data.get("problems"):
        return ConfigError([Problem(**p) for p in data["problems"]])
    if code == ErrorCode.START_FAILED:
        return StartFailed(message, hint=hint)
    if code == ErrorCode.STATE_ERROR:
        return StateError(message, hint=hint)
    if code.exit_code == 2:
        return UserError(message, hint=hint)
    return OrchError(message, hint=hint)


# --- requests -------------------------------------------------------------------


def _names(names: list[str]) -> None:
    if not names:
        raise ValueError("name at least one instance")


@dataclass
class UpRequest:
    __pydantic_config__ = _STRICT
    names: list[str]
    strict: bool = False

    def __post_init__(self) -> None:
        _names(self.names)


@dataclass
class DownRequest:
    __pydantic_config__ = _STRICT
    names: list[str]
    timeout: float | None = None

    def __post_init__(self) -> None:
        _names(self.names)
        if self.timeout is not None and self.timeout < 0:
            raise ValueError("timeout must be 0 or more seconds")


@dataclass
class RestartRequest:
    __pydantic_config__ = _STRICT
    names: list[str]
    rolling: bool = False

    def __post_init__(self) -> None:
        _names(self.names)


@dataclass
class LogsRequest:
    """Copy these instances' logs from their cluster nodes into the home now."""

    __pydantic_config__ = _STRICT
    names: list[str]

    def __post_init__(self) -> None:
        _names(self.names)


@dataclass
class RmRequest:
    __pydantic_config__ = _STRICT
    name: str
    force: bool = False


@dataclass
class ShutdownRequest:
    __pydantic_config__ = _STRICT
    all: bool = False


@dataclass
class PlanRequest:
    __pydantic_config__ = _STRICT
    text: str
    source: str
    base_dir: str
    vars: dict[str, str] = field(default_factory=dict)


# --- replies --------------------------------------------------------------------


@dataclass
class UpReply:
    results: list[UpResult]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpReply:
        return cls([UpResult(**r) for r in data["results"]])


@dataclass
class DownReply:
    stopped: list[str]


@dataclass
class RmReply:
    removed: str


@dataclass
class ShutdownReply:
    stopping: bool
    instances: str  # "stop" | "keep running"


@dataclass
class PlanReply:
    id: str
    unserved: list[str] = field(default_factory=list)


@dataclass
class CancelReply:
    cancelled: list[str]  # the tasks that were running and were stopped


@dataclass
class RetryReply:
    requeued: list[str]


# --- what commands act on ---------------------------------------------------------


class Control(Protocol):
    """up/down/restart/rm and the plan verbs, by the daemon when it runs or by
    the engine here (which runs no plans: it refuses them, saying why)."""

    def up(
        self,
        names: list[str],
        *,
        wait: bool = True,
        timeout: float = 300,
        on_progress: Progress | None = None,
        strict: bool = False,
    ) -> list[UpResult]: ...

    def down(self, names: list[str], timeout: float | None = None) -> list[str]: ...

    def restart(
        self,
        names: list[str],
        *,
        timeout: float = 300,
        on_progress: Progress | None = None,
        rolling: bool = False,
    ) -> list[UpResult]:
        """`rolling`: one at a time, each drained first and healthy again before
        the next (needs the daemon's router: the engine refuses it)."""
        ...

    def rm(self, name: str, force: bool = False) -> None: ...

    def status(self) -> StatusReply:
        """What `ps` shows (`engine.status.collect`, run where the state is owned)."""
        ...

    def activity(self) -> Activity:
        """What only the daemon knows: its load queue and the requests in
        flight (empty without a daemon, or one that does not answer in time)."""
        ...

    def submit_plan(self, path: Path, text: str, given_vars: dict[str, str]) -> PlanReply:
        """Hand a checked plan file to the daemon: its run id, and the models
        no healthy instance serves now."""
        ...

    def cancel_plan(self, run_id: str) -> CancelReply: ...

    def retry_plan(self, run_id: str) -> RetryReply: ...
