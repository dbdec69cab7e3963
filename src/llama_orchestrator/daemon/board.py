"""What the router sees of the fleet: the replicas that may take requests now,
and every model name the configs offer.

The instance runners publish here (a runner is healthy and not draining, or
it is not); the router reads it on every request and is told of each change
through `watch`, so that queued requests get a replica as soon as one is up.
"""

from __future__ import annotations

from collections.abc import Callable

from llama_orchestrator.router.balance import Replica

__all__ = ["Board"]


class Board:
    def __init__(self) -> None:
        #: instance name -> its replica, for those that may take requests now
        self.replicas: dict[str, Replica] = {}
        #: every alias and `tags:` name the configs offer (503 rather than 404)
        self.known: set[str] = set()
        #: the names the external upstreams' configs offer (`daemon.upstreams`)
        self.remote_known: set[str] = set()
        #: the names the peers' instances offer (`daemon.peers`), also while one is away
        self.peer_known: set[str] = set()
        self._watchers: list[Callable[[], None]] = []

    def names(self) -> set[str]:
        """Every model name a request or a plan may use."""
        return self.known | self.remote_known | self.peer_known

    def watch(self, fn: Callable[[], None]) -> None:
        """Call fn() after every change of `replicas`."""
        self._watchers.append(fn)

    def publish(self, name: str, replica: Replica | None) -> None:
        """`name` takes requests as `replica` from now on (None: it takes none)."""
        if replica is None:
            if self.replicas.pop(name, None) is None:
                return
        else:
            if self.replicas.get(name) == replica:
                return
            self.replicas[name] = replica
        for fn in self._watchers:
            fn()
