"""Is a daemon running for this home, and how to reach it (cheap: no FastAPI).

One daemon per home holds an exclusive lock on `state/daemon.lock` for its
whole life; the kernel drops the lock when it dies, even by SIGKILL, so the
lock (not a pid file) says whether one runs. Once its control API listens, it
writes `state/daemon.json` (mode 0600): pid, create_time, address, token.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from llama_orchestrator.engine.process import ProcRef, is_alive
from llama_orchestrator.files import atomic_write_text
from llama_orchestrator.home import Home, daemon_lock_held
from llama_orchestrator.platform import try_lock

__all__ = [
    "DaemonInfo",
    "lock_is_held",
    "take_lock",
    "running",
    "write_info",
    "wait_running",
]


@dataclass(frozen=True)
class DaemonInfo:
    pid: int
    create_time: float
    started_at: float
    transport: str  # "unix" (socket is a path) or "tcp" (127.0.0.1:port + token)
    socket: str | None = None
    port: int | None = None
    token: str | None = None
    version: str = ""
    router_url: str | None = None
    router_error: str | None = None  # why the router does not listen, when it does not

    @property
    def address(self) -> str:
        return self.socket if self.transport == "unix" and self.socket else f"127.0.0.1:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: kept under its old name: the daemon's modules and the tests use it
lock_is_held = daemon_lock_held


def _read(home: Home) -> DaemonInfo | None:
    try:
        data = json.loads(home.daemon_info.read_text(encoding="utf-8"))
        return DaemonInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


#: how long a daemon that finds the lock taken, and no daemon's address,
#: tries again before it gives way
LOCK_GRACE_S = 0.5


def take_lock(home: Home) -> Any:
    """The home's daemon lock, or None while another daemon holds it. A CLI
    that asks whether a daemon runs (`daemon_lock_held`) holds the lock for a
    moment to find out: a daemon starting in that moment tries again rather
    than take the asker for a daemon (seen under load, right after a stop).
    A daemon that is up (its address written) is given way to at once: a
    second `up`'s daemon must not outwait it and start after it stops."""
    deadline = time.monotonic() + LOCK_GRACE_S
    while (lock := try_lock(home.daemon_lock)) is None:
        if running(home) is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.01)
    return lock


def running(home: Home) -> DaemonInfo | None:
    """The live daemon of `home` whose control API is up, or None."""
    if not lock_is_held(home):
        return None
    info = _read(home)
    if info is None or not is_alive(ProcRef(info.pid, info.create_time)):
        return None  # holding the lock but still starting (or a stale file)
    return info


def wait_running(home: Home, timeout: float) -> DaemonInfo | None:
    """Wait for a daemon that holds the lock to write its address."""
    deadline = time.monotonic() + timeout
    while True:
        info = running(home)
        if info is not None or not lock_is_held(home) or time.monotonic() > deadline:
            return info
        time.sleep(0.02)


def write_info(home: Home, info: DaemonInfo) -> None:
    atomic_write_text(home.daemon_info, json.dumps(info.to_json(), indent=2) + "\n")
