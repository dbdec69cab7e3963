"""One model load at a time: the daemon's load queue (`loads.max_concurrent`).

Loading a model reads gigabytes from one disk and pushes them over one PCIe
bus; on a rig of cards on x1 risers, five loads at once each take five times
as long and outlast their `start_period`. So every start the daemon makes
(`up`, its own start, a restart, an on-demand start, a rolling restart)
first takes a load slot; the others wait, `queued`, and a slot frees when a
load ends: the server answers /health (healthy), fails its checks
(unhealthy), exits, or is stopped.

`LoadQueue` is the decision, pure: who loads, who waits, in what order
(on-demand starts first, since requests wait on them; then first come,
first served). `LoadGate` holds it in the daemon and tells the waiting
runners, through a future each, when their turn comes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

__all__ = ["LoadQueue", "LoadGate"]


@dataclass
class LoadQueue:
    """`limit` loads at once (0: no limit); the rest wait, urgent ones first."""

    limit: int = 1
    loading: list[str] = field(default_factory=list)
    waiting: list[tuple[bool, str]] = field(default_factory=list)  # (urgent, name), in order

    def _room(self) -> bool:
        return self.limit <= 0 or len(self.loading) < self.limit

    def enter(self, name: str, urgent: bool = False) -> bool:
        """Ask to load `name`: True when it may load now, else it waits its
        turn (asking again while waiting may make it urgent, never later)."""
        if name in self.loading:
            return True
        was = next((u for u, n in self.waiting if n == name), None)
        if was is not None:
            if urgent and not was:
                self.waiting.remove((was, name))
                self._insert(True, name)
            return False
        if not self.waiting and self._room():
            self.loading.append(name)
            return True
        self._insert(urgent, name)
        return False

    def _insert(self, urgent: bool, name: str) -> None:
        at = len(self.waiting)
        if urgent:  # after the urgent ones already waiting, before the rest
            at = next((i for i, (u, _) in enumerate(self.waiting) if not u), at)
        self.waiting.insert(at, (urgent, name))

    def take(self, name: str) -> None:
        """`name` is loading already (a process adopted while it starts):
        it holds a slot, even beyond the limit."""
        self.waiting = [(u, n) for u, n in self.waiting if n != name]
        if name not in self.loading:
            self.loading.append(name)

    def leave(self, name: str) -> list[str]:
        """`name` loads no more (or waits no more); the ones whose turn came."""
        if name in self.loading:
            self.loading.remove(name)
        self.waiting = [(u, n) for u, n in self.waiting if n != name]
        return self.grant()

    def grant(self) -> list[str]:
        """Move waiting ones into the free slots (after a leave, or a raised limit)."""
        granted = []
        while self.waiting and self._room():
            _, name = self.waiting.pop(0)
            self.loading.append(name)
            granted.append(name)
        return granted

    def positions(self) -> dict[str, tuple[int, int]]:
        """{name: (k, n)}: load k of the n loading or waiting."""
        order = self.loading + [n for _, n in self.waiting]
        return {name: (k, len(order)) for k, name in enumerate(order, 1)}

    def position(self, name: str) -> tuple[int, int] | None:
        return self.positions().get(name)


class LoadGate:
    """The daemon's load queue, with a future per waiting runner."""

    def __init__(self, limit: int = 1) -> None:
        self.queue = LoadQueue(limit)
        self._turns: dict[str, asyncio.Future[None]] = {}

    def enter(self, name: str, urgent: bool = False) -> asyncio.Future[None] | None:
        """None: load now. Else a future done when its turn comes."""
        if self.queue.enter(name, urgent):
            return None
        turn = self._turns.get(name)
        if turn is None or turn.done():
            turn = self._turns[name] = asyncio.get_running_loop().create_future()
        return turn

    def take(self, name: str) -> None:
        self.queue.take(name)
        self._cancel(name)

    def leave(self, name: str) -> None:
        self._cancel(name)
        self._wake(self.queue.leave(name))

    def set_limit(self, limit: int) -> None:
        self.queue.limit = limit
        self._wake(self.queue.grant())

    def position(self, name: str) -> list[int] | None:
        """[k, n]: load k of the n loading or waiting (as the API sends it)."""
        kn = self.queue.position(name)
        return list(kn) if kn else None

    def positions(self) -> dict[str, list[int]]:
        return {name: list(kn) for name, kn in self.queue.positions().items()}

    def loading(self, name: str) -> bool:
        return name in self.queue.loading

    def _cancel(self, name: str) -> None:
        turn = self._turns.pop(name, None)
        if turn is not None and not turn.done():
            turn.cancel()

    def _wake(self, names: list[str]) -> None:
        for name in names:
            turn = self._turns.pop(name, None)
            if turn is not None and not turn.done():
                turn.set_result(None)
