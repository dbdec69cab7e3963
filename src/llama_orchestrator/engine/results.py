"""What starting and ending an instance gives (pure): the result of an
`up`, how a process's end is recorded and told, the row a start records.

Shared by every launch: the engine's (`engine.lifecycle.Engine.spawn`), the
daemon's through it, and the fake world's in the tests, so that they record
the same row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llama_orchestrator import platform
from llama_orchestrator.errors import UserError
from llama_orchestrator.states import Desired
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.rows import InstanceRow

__all__ = [
    "UpResult",
    "Progress",
    "EXIT_TAIL_LINES",
    "exit_text",
    "ended",
    "started",
    "running_rm_refused",
    "with_tail",
]

EXIT_TAIL_LINES = 20

#: on_progress(name, phase, elapsed_s, detail): phase is "queued" (waiting for its
#: turn to load), "starting", "loading" or "healthy"
Progress = Callable[[str, str, float, str], None]


@dataclass
class UpResult:
    name: str
    #: "started" | "already running" | "queued" (waiting for its turn to load) |
    #: "waiting" (a start that cannot happen now: a cluster's node lost, no room; `notes` say why)
    outcome: str
    pid: int | None
    port: int
    healthy: bool = False
    error: str | None = None
    #: running with a command line that differs from what its config gives now
    stale: bool = False
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: queued: [k, n], load k of the n loading or waiting (`loads.max_concurrent`)
    load_position: list[int] | None = None
    #: where it listens when not on this machine (a cluster node's address)
    host: str | None = None


def exit_text(info: dict[str, Any]) -> str:
    """How a process ended, from a `last_exit` record, for people."""
    if info.get("lost"):  # a cluster node's server, its node lost (daemon.cluster)
        return f"was lost with its node {info['lost']}"
    if info.get("signal"):
        return f"was killed by signal {info['signal']} ({platform.signal_name(info['signal'])})"
    if info.get("code") is not None:
        return f"exited with code {info['code']}"
    # Only a process's parent learns its exit code; an instance started by a
    # CLI that has since exited has no parent of ours (the daemon fixes that).
    return "exited (exit code unknown: llama-orch was not its parent)"


def ended(row: InstanceRow, info: dict[str, Any]) -> tuple[S, str, dict[str, Any]]:
    """How `row` records the end of its process, from `Engine.exit_info`
    (pure): the new state, the event's message, and the row's changes."""
    new = S.STOPPED if row.state == S.STOPPING else S.EXITED
    changes = {
        "exit_code": info["code"] if info["signal"] is None else -info["signal"],
        "exited_at": info["at"],
        "last_exit": info,
    }
    return new, f"process {row.pid} {exit_text(info)}", changes


def running_rm_refused(name: str) -> UserError:
    return UserError(
        f"Instance '{name}' is running.",
        hint=f"Stop it with `llama-orch down {name}` first, or use `rm --force`.",
    )


def with_tail(message: str, lines: list[str]) -> str:
    if not lines:
        return message
    return message + " Last lines of its stderr:\n" + "\n".join(f"  | {ln}" for ln in lines)


def started(
    pid: int,
    create_time: float,
    host: str,
    port: int,
    at: float,
    *,
    supervised: bool,
    devices: list[int] | None = None,
    digest: str | None = None,
    fresh: bool = True,
) -> tuple[S, str, dict[str, Any], dict[str, Any]]:
    """How a row records the start of its process: the state, the event's
    message and data, and the row's changes (`fresh`: a user's up/restart,
    which gives a failed instance its restart budget back)."""
    changes: dict[str, Any] = {
        "desired": Desired.RUNNING,
        "pid": pid,
        "create_time": create_time,
        "host": host,
        "port": port,
        "gpu_devices": devices,
        "started_at": at,
        "exited_at": None,
        "exit_code": None,
        "supervised": supervised,
        "next_restart_at": None,
        "config_digest": digest,
    }
    if fresh:
        changes.update(restarts=0, streak=0)
    return S.STARTING, f"started process {pid} on port {port}", {"pid": pid, "port": port}, changes
