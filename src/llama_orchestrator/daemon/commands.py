"""What an `InstanceRunner` is told (`daemon.runner`): the commands others
send it and await the answer to (Start, Stop, Adopt, Resume, Remove), and
the messages its own tasks post to it (Probed, Exited, RestartDue,
LoadTurn, StopFailed). It handles one at a time."""

from __future__ import annotations

from dataclasses import dataclass

from llama_orchestrator.config.prepare import Prepared
from llama_orchestrator.engine import health
from llama_orchestrator.engine.logs import LoadProgress
from llama_orchestrator.engine.process import ProcRef
from llama_orchestrator.store.rows import InstanceRow

__all__ = [
    "Start",
    "Stop",
    "Adopt",
    "Resume",
    "Remove",
    "Probed",
    "Exited",
    "RestartDue",
    "LoadTurn",
    "StopFailed",
    "Command",
]


@dataclass(frozen=True)
class Start:
    """Start the prepared launch, or take over the process already running.
    `fresh`: a user's up/restart (a failed instance gets its budget back).
    `eager`: requests wait for it (on demand): probe every 50 ms while loading."""

    prepared: Prepared
    fresh: bool = True
    eager: bool = False


@dataclass(frozen=True)
class Stop:
    """Drain (no new requests, those in flight finish), then stop the process
    tree; `timeout` overrides `stop_timeout`. Answers whether a process was stopped."""

    timeout: float | None = None


@dataclass(frozen=True)
class Adopt:
    """Supervise a process an earlier daemon started (the daemon's start)."""

    row: InstanceRow


@dataclass(frozen=True)
class Resume:
    """A restart an earlier daemon had scheduled: do it at `at`."""

    at: float


@dataclass(frozen=True)
class Remove:
    """Forget the instance: state, config folder, logs (stopped first with `force`)."""

    force: bool = False


@dataclass(frozen=True)
class Probed:
    ref: ProcRef
    result: health.ProbeResult
    progress: LoadProgress | None = None  # what its logs said, while it loads


@dataclass(frozen=True)
class Exited:
    ref: ProcRef


@dataclass(frozen=True)
class RestartDue:
    token: int


@dataclass(frozen=True)
class LoadTurn:
    """A load slot is ours: the start that waited for it goes ahead."""


@dataclass(frozen=True)
class StopFailed:
    """Stopping an unhealthy process raised (no descriptor left, ...)."""

    ref: ProcRef
    error: str


Command = (
    Start | Stop | Adopt | Resume | Remove | Probed | Exited | RestartDue | StopFailed | LoadTurn
)
