"""The daemon's parts, built in the order they need each other, started and
stopped in one place. No part is handed another after construction; what
changes later reaches the others through the board's watchers.

`daemon.main` builds them on the real world (LiveEffects, the state
database, the sockets it serves); the tests build the same parts on the
fake one (`tests/fakes/fake_effects.FakeEffects`) and drive them without a
process or a socket.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from llama_orchestrator.config.settings import Settings
from llama_orchestrator.daemon.board import Board
from llama_orchestrator.daemon.effects import Effects
from llama_orchestrator.daemon.hosttasks import HostTasks
from llama_orchestrator.daemon.leases import Leases
from llama_orchestrator.daemon.loads import LoadGate
from llama_orchestrator.daemon.metrics import Metrics
from llama_orchestrator.daemon.ondemand import OnDemand
from llama_orchestrator.daemon.peers import Peers
from llama_orchestrator.daemon.plans import PlanRunner
from llama_orchestrator.daemon.runner import RunnerDeps
from llama_orchestrator.daemon.supervisor import Supervisor
from llama_orchestrator.daemon.switching import ModelSwitch
from llama_orchestrator.daemon.upstreams import Upstreams, UsageWriter, getter
from llama_orchestrator.home import Home
from llama_orchestrator.router.external import Externals
from llama_orchestrator.router.proxy import Router
from llama_orchestrator.router.slots import Slots
from llama_orchestrator.store.database import Store
from llama_orchestrator.store.rows import UsageRecord
from llama_orchestrator.wire.pool import Pool

__all__ = ["Parts", "InStore"]

#: run fn(store) where the store may be written (LiveEffects: in a worker
#: thread, on that thread's connection)
InStore = Callable[[Callable[[Store], Any]], Awaitable[Any]]


@dataclass
class Parts:
    home: Home
    settings: Settings
    effects: Effects
    store: Store  # the loop's connection
    metrics: Metrics
    board: Board  # who takes requests now, and the names configs offer
    slots: Slots
    usage: UsageWriter
    externals: Externals
    upstreams: Upstreams
    sup: Supervisor
    leases: Leases
    on_demand: OnDemand
    switch: ModelSwitch  # loads and unloads through the router; why a model is stopped
    router: Router
    peers: Peers
    plans: PlanRunner

    @classmethod
    def build(
        cls,
        home: Home,
        settings: Settings,
        effects: Effects,
        pool: Pool,
        store: Store,
        in_store: InStore,
        rng: random.Random | None = None,
    ) -> Parts:
        """Every part, on `effects` and `pool` (the daemon's one HTTP client)."""
        metrics = Metrics(store)
        board = Board()
        slots = Slots(
            settings.router,
            lambda: board.replicas.values(),
            clock=effects.now,
            on_wait=metrics.queue_wait,
        )
        board.watch(slots.wake)  # a replica up (or freed): queued requests are served at once
        usage = UsageWriter(in_store)

        def on_usage(record: UsageRecord) -> None:
            usage.add(record)
            metrics.upstream_usage(record)

        def event(name: str | None, kind: str, message: str) -> None:
            store.add_event(name, kind, message)

        externals = Externals(on_usage=on_usage, on_event=event)
        upstreams = Upstreams(effects.load_upstreams, board, externals, event, getter(pool))
        externals.on_refused = upstreams.refused
        deps = RunnerDeps(
            store,
            effects,
            board,
            slots.settle,
            rng=rng or random.Random(),
            on_health=metrics.health,
            loads=LoadGate(settings.loads.max_concurrent),
        )
        sup = Supervisor(home, deps, upstreams)
        leases = Leases(sup, busy=slots.busy, changed=slots.wake)
        on_demand = OnDemand(sup, slots, settings, held=leases.holds_for)
        switch = ModelSwitch(sup, on_demand)
        router = Router(
            settings.router,
            lambda: board.replicas,
            board.names,
            metrics.router_hooks(),
            loader=on_demand,
            slots=slots,
            externals=externals,
            pool=pool,
            stopped=switch.why_stopped,
        )
        peers = Peers(
            settings.peers,
            home.root,
            board,
            pool,
            router.in_flight,
            event,
            clock=effects.now,
        )
        metrics.watch_router(router)
        plans = PlanRunner(
            home,
            store,
            router,
            lambda: board.names() if peers.all_seen() else None,
            leases=leases,
            hosts=HostTasks(settings.peers),
            # a cluster home's script tasks run on its nodes (`ClusterEffects.scripts`)
            cluster=getattr(effects, "scripts", None),
        )
        return cls(
            home,
            settings,
            effects,
            store,
            metrics,
            board,
            slots,
            usage,
            externals,
            upstreams,
            sup,
            leases,
            on_demand,
            switch,
            router,
            peers,
            plans,
        )

    async def start(self) -> None:
        """Start each part, in the order they need each other."""
        await self.usage.start(self.externals, self.effects.now())  # the last day's spending
        await self.upstreams.start()
        await self.sup.start()
        await self.leases.start()  # a killed daemon's leases given back, what yielded restored
        self.on_demand.start()
        self.peers.start()
        await self.plans.start()

    async def stop(self, stop_instances: bool) -> None:
        """Stop supervising (the instances too with `stop_instances`, drained
        through the router first: it still serves meanwhile)."""
        await self.plans.shutdown()  # runs stay open in the database: the next daemon resumes them
        await self.upstreams.close()
        await self.usage.close()  # what upstream requests cost, all of it written
        await self.on_demand.close()
        await self.peers.close()
        await self.leases.close()
        await self.sup.shutdown(stop_instances)

    async def close(self) -> None:
        """The router's connections closed (once nothing serves through it)."""
        await self.router.close()
