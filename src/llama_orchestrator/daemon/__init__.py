"""The supervisor daemon: one per home (DESIGN §5).

`control()` is what commands call to act on instances: the daemon when one
runs (started first when asked), the engine directly otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

from llama_orchestrator.daemon.client import Supervised
from llama_orchestrator.daemon.info import DaemonInfo, running
from llama_orchestrator.engine.lifecycle import Engine

__all__ = ["Control", "control"]

#: both offer up(), down(), restart() and rm() with the same signatures
Control = Engine | Supervised


def control(
    engine: Engine, start: bool, on_start: Callable[[DaemonInfo], None] | None = None
) -> Control:
    """The daemon of engine's home if it runs (or once started, with `start`);
    else the engine itself, and what it starts runs unsupervised."""
    info = running(engine.home)
    if info is None and start:
        from llama_orchestrator.daemon.main import start_background

        started = start_background(engine.home)
        info = started.info
        if started.new and on_start is not None:
            on_start(info)
    return Supervised(engine, info) if info is not None else engine
