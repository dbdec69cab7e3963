"""Instance states and the transitions allowed between them (DESIGN §3).

A leaf module: it imports nothing from the package, so the store, the engine,
the daemon and the TUI can all share one definition.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["InstanceState", "Desired", "ALLOWED", "is_allowed", "RUNNING_STATES"]


class InstanceState(str, Enum):
    CREATED = "created"
    QUEUED = "queued"  # waiting for its turn to load (`loads.max_concurrent`)
    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    BACKOFF = "backoff"  # waiting to restart
    STOPPING = "stopping"
    STOPPED = "stopped"
    EXITED = "exited"  # died, no restart due
    FAILED = "failed"  # restart budget exhausted

    def __str__(self) -> str:
        return self.value


class Desired(str, Enum):
    RUNNING = "running"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


S = InstanceState

#: States in which a process of the instance is expected to exist.
RUNNING_STATES = frozenset({S.STARTING, S.HEALTHY, S.UNHEALTHY, S.STOPPING})

ALLOWED: dict[InstanceState, frozenset[InstanceState]] = {
    # -> BACKOFF from a rest: a start that must wait (a cluster node lost, no room)
    S.CREATED: frozenset({S.QUEUED, S.STARTING, S.STOPPED, S.BACKOFF}),
    S.QUEUED: frozenset({S.STARTING, S.STOPPED, S.BACKOFF, S.EXITED, S.FAILED}),
    S.STARTING: frozenset({S.HEALTHY, S.UNHEALTHY, S.EXITED, S.BACKOFF, S.FAILED, S.STOPPING}),
    S.HEALTHY: frozenset({S.UNHEALTHY, S.EXITED, S.BACKOFF, S.FAILED, S.STOPPING}),
    S.UNHEALTHY: frozenset({S.HEALTHY, S.EXITED, S.BACKOFF, S.FAILED, S.STOPPING}),
    S.BACKOFF: frozenset({S.QUEUED, S.STARTING, S.FAILED, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED, S.EXITED}),
    S.STOPPED: frozenset({S.QUEUED, S.STARTING, S.BACKOFF}),
    S.EXITED: frozenset({S.QUEUED, S.STARTING, S.BACKOFF, S.FAILED, S.STOPPED}),
    S.FAILED: frozenset({S.QUEUED, S.STARTING, S.STOPPED, S.BACKOFF}),
}


def is_allowed(old: InstanceState, new: InstanceState) -> bool:
    """Staying in a state is always allowed; moving needs an entry in ALLOWED."""
    return old == new or new in ALLOWED[old]
