"""The daemon's peers (`"peers"` in llama-orch.json; see `llama_orchestrator.router.peers`):
one task per peer that asks its router for its state every `refresh`
seconds, over the router's own pooled keep-alive client, and keeps its
replicas on the board while it answers.

A peer that does not answer within `timeout` (or answers with an error) is
taken off the board at once, and the connections to it are dropped, so that
requests waiting there fail as if its link had: those not yet answered are
retried on another replica (the router's rule). It is asked again every
`refresh` seconds, and is back on the board with its first answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from llama_orchestrator.config.settings import PeerSettings
from llama_orchestrator.daemon.board import Board
from llama_orchestrator.daemon.tasks import OwnedTasks
from llama_orchestrator.errors import OrchError
from llama_orchestrator.router.peers import STATE_PATH, names_of, parse_state, replicas_of
from llama_orchestrator.upstreams import read_key
from llama_orchestrator.wire.pool import Pool, PoolError, origin

__all__ = ["Peers", "PeerState"]

log = logging.getLogger("llama_orchestrator.daemon")

#: add_event(instance, kind, message)
EventSink = Callable[[str | None, str, str], None]


@dataclass
class PeerState:
    url: str
    state: str = "checking"  # then "reachable" or "unreachable"
    error: str | None = None
    checked_at: float | None = None
    instances: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.state,
            "error": self.error,
            "checked_at": self.checked_at,
            "instances": self.instances,
        }


class Peers:
    def __init__(
        self,
        peers: list[PeerSettings],
        home_root: Path,
        board: Board,
        pool: Pool,
        in_flight: Mapping[str, int],
        add_event: EventSink,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.peers = peers
        self.home_root = home_root
        self.board = board
        self.pool = pool
        self.in_flight = in_flight
        self._event = add_event
        self.clock = clock
        self.states = {p.name: PeerState(p.url) for p in peers}
        self._published: dict[str, set[str]] = {p.name: set() for p in peers}
        self._names: dict[str, set[str]] = {}
        self._tasks = OwnedTasks("peers")  # one watch per peer

    def start(self) -> None:
        for p in self.peers:
            self._tasks.start(partial(self._watch, p), key=p.name, renew_after=1.0)

    async def close(self) -> None:
        await self._tasks.close()
        for p in self.peers:
            self._withdraw(p.name, set())

    async def _watch(self, peer: PeerSettings) -> None:
        state = self.states[peer.name]
        while True:
            try:
                why = await self.look(peer)
            except Exception as exc:  # a bug of ours must not end the watch
                log.exception("looking at peer %s failed", peer.name)
                why = f"{type(exc).__name__}: {exc}"
            old = state.state
            state.checked_at = self.clock()
            state.state, state.error = ("reachable", None) if why is None else ("unreachable", why)
            if state.state != old:
                message = (
                    f"peer {peer.name} ({peer.url}) answers"
                    if why is None
                    else f"peer {peer.name} ({peer.url}) does not answer: {why}"
                )
                self._event(None, f"peer_{state.state}", message)
            await asyncio.sleep(peer.refresh)

    async def look(self, peer: PeerSettings) -> str | None:
        """Ask the peer for its state and publish its replicas; why not (None: done)."""
        try:
            key = read_key(
                f"peer '{peer.name}'", peer.api_key_env, peer.api_key_file, self.home_root
            )
        except OrchError as exc:
            self._lost(peer)
            return exc.message
        host, port, tls = origin(peer.url)
        headers = {"Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            ask = self.pool.fetch(host, port, "GET", STATE_PATH, headers, tls=tls)
            status, body = await asyncio.wait_for(ask, peer.timeout)
        except asyncio.TimeoutError:
            self._lost(peer)
            return f"no answer within {peer.timeout:g}s"
        except PoolError as exc:
            self._lost(peer)
            return str(exc)
        if status != 200:
            self._lost(peer)
            hint = " (this machine's key for it is not one of its router.api_keys)" * (
                status == 401
            )
            return f"HTTP {status} from {STATE_PATH}{hint}"
        try:
            instances = parse_state(json.loads(body))
        except ValueError as exc:
            self._lost(peer)
            return f"{STATE_PATH} answered {exc} (is it llama-orch's router?)"
        replicas = replicas_of(peer.name, peer.url, key, instances, self.in_flight)
        self._withdraw(peer.name, set(replicas))
        for name, replica in replicas.items():
            self.board.publish(name, replica)
        self._published[peer.name] = set(replicas)
        self._names[peer.name] = names_of(instances)
        self.board.peer_known = set().union(*self._names.values())
        self.states[peer.name].instances = [
            {
                "name": i.name,
                "alias": i.alias,
                "tags": list(i.tags),
                "slots": i.slots,
                "in_flight": i.in_flight,
            }
            for i in instances
        ]
        return None

    def _lost(self, peer: PeerSettings) -> None:
        """Off the board, and its connections dropped (see the module's doc)."""
        self._withdraw(peer.name, set())
        self.states[peer.name].instances = []
        self.pool.abort(*origin(peer.url))

    def _withdraw(self, peer: str, keep: set[str]) -> None:
        for name in self._published.get(peer, set()) - keep:
            self.board.publish(name, None)
        self._published[peer] = self._published.get(peer, set()) & keep

    def all_seen(self) -> bool:
        """Whether every peer has answered once: until then, what models
        there are is not known (a plan naming one of theirs is not refused)."""
        return all(p.name in self._names for p in self.peers)

    def to_json(self) -> dict[str, Any]:
        return {name: s.to_json() for name, s in self.states.items()}
