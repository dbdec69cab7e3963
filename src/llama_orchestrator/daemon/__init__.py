"""The supervisor daemon: one per home (DESIGN §5).

`control()` is what commands call to act on instances: the daemon when one
runs (started first when asked), the engine directly otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

from llama_orchestrator.daemon.client import Supervised
from llama_orchestrator.daemon.info import DaemonInfo, running
from llama_orchestrator.daemon.protocol import Control
from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.engine.unsupervised import Unsupervised
from llama_orchestrator.home import Home

__all__ = ["Control", "control", "ensure_running"]


def control(
    engine: Engine, start: bool, on_start: Callable[[DaemonInfo], None] | None = None
) -> Control:
    """The daemon of engine's home if it runs (or once started, with `start`);
    else the engine's own control, and what it starts runs unsupervised."""
    info = ensure_running(engine.home, on_start) if start else running(engine.home)
    return Supervised(engine, info) if info is not None else Unsupervised(engine)


def ensure_running(home: Home, on_start: Callable[[DaemonInfo], None] | None = None) -> DaemonInfo:
    """The home's daemon; started in the background (on_start told) if none runs."""
    info = running(home)
    if info is None:
        from llama_orchestrator.daemon.main import start_background

        started = start_background(home)
        info = started.info
        if started.new and on_start is not None:
            on_start(info)
    return info
