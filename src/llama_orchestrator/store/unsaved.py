"""What a full disk refused, kept in memory until a write succeeds."""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any

from llama_orchestrator.errors import DiskFull
from llama_orchestrator.store.rows import InstanceRow

__all__ = ["Unsaved", "Write"]

log = logging.getLogger("llama_orchestrator.daemon")

#: one write of a transaction, kept in case the disk refuses it:
#: ("row", InstanceRow) or ("event", (ts, instance, kind, message, data as JSON))
Write = tuple[str, Any]


class Unsaved:
    """What the disk refused, kept in memory for every connection of one
    process (the daemon's): the newest row of each instance and the events,
    in order, until a write succeeds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, InstanceRow] = {}
        self._events: list[tuple[Any, ...]] = []
        self.since: float | None = None  # when the disk first refused
        self.error: DiskFull | None = None  # what it said last

    def __bool__(self) -> bool:
        return bool(self._rows or self._events)

    @property
    def changes(self) -> int:
        return len(self._rows) + len(self._events)

    def keep(self, writes: list[Write], error: DiskFull, now: float) -> None:
        with self._lock:
            first = self.since is None
            for kind, value in writes:
                if kind == "row":
                    self._rows[value.name] = copy.deepcopy(value)
                else:
                    self._events.append(value)
            self.error = error
            if first:
                self.since = now
        if first:
            log.error(f"{error} The daemon goes on from memory and writes its state when it can.")

    def row(self, name: str) -> InstanceRow | None:
        with self._lock:
            row = self._rows.get(name)
        return copy.deepcopy(row) if row is not None else None

    def rows(self) -> list[InstanceRow]:
        with self._lock:
            return [copy.deepcopy(r) for r in self._rows.values()]

    def snapshot(self) -> tuple[dict[str, InstanceRow], list[tuple[Any, ...]]]:
        with self._lock:
            return dict(self._rows), list(self._events)

    def written(self, rows: dict[str, InstanceRow], events: int, now: float) -> None:
        """Forget what a flush wrote (rows kept since then stay)."""
        with self._lock:
            for name, row in rows.items():
                if self._rows.get(name) is row:
                    del self._rows[name]
            del self._events[:events]
            since, done = self.since, not self
            if done:
                self.since = self.error = None
        if done and since is not None:
            log.warning(
                f"The state database is written again, after {now - since:.0f}s "
                "of a full disk: nothing was lost."
            )

    def saved(self, name: str) -> None:
        """A newer row of `name` is on disk: the kept one is stale."""
        with self._lock:
            self._rows.pop(name, None)
