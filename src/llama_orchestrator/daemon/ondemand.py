"""On-demand instances in the daemon (issue 9): the router wakes one when a
request names it, idle ones are stopped, and VRAM is made by swapping out the
least recently used idle ones. The decisions are `swap`'s (pure); this
is the asyncio shell that gathers the facts (the store, the router's slots,
the GPUs and model files through the effects) and acts through the
supervisor's instance runners, so a stop drains like any `down` and every
start goes through `up`'s checks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from llama_orchestrator.config.fit import demand, on_cards
from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.config.settings import Settings
from llama_orchestrator.config.validate import offered_names
from llama_orchestrator.daemon.effects import Effects, changed_within
from llama_orchestrator.daemon.supervisor import Supervisor
from llama_orchestrator.daemon.swap import Member, StartPlan, idle_due, plan_start
from llama_orchestrator.daemon.tasks import OwnedTasks
from llama_orchestrator.engine.results import exit_text
from llama_orchestrator.errors import OrchError
from llama_orchestrator.models.catalog import model_file
from llama_orchestrator.models.gguf import MIB, ModelError
from llama_orchestrator.names import serves
from llama_orchestrator.router.balance import candidates
from llama_orchestrator.router.slots import Slots
from llama_orchestrator.states import RUNNING_STATES

__all__ = ["OnDemand", "TICK"]

#: how often idle stops are checked and last-used times written
TICK = 0.25
#: last-used times are written when they moved by this much (ps, the dashboard)
WRITE_EVERY = 1.0

log = logging.getLogger("llama_orchestrator.daemon")


class OnDemand:
    """The router's `Loader`: starts, swaps and idle-stops on-demand instances."""

    def __init__(
        self,
        sup: Supervisor,
        slots: Slots,
        settings: Settings,
        held: Callable[[str], bool] = lambda model: False,
    ) -> None:
        self.sup = sup
        self.slots = slots
        #: an instance serving the model yielded its GPU to a script: requests wait
        self.held = held
        self.queue_timeout = settings.router.queue_timeout
        self.fx: Effects = sup.effects
        self.max_running = {g: s.max_running for g, s in settings.groups.items()}
        self.starting: set[str] = set()  # on their way up (each a task of _tasks)
        self.stopping: set[str] = set()
        self._written: dict[str, float] = {}
        self._changed = asyncio.Event()  # a request ended or an instance stopped
        self._waiting = 0  # starts waiting for room
        self._tasks = OwnedTasks("on-demand")  # the idle loop, starts and idle stops

    def start(self) -> None:
        self._tasks.start(self._loop, renew_after=1.0)

    async def close(self) -> None:
        await self._tasks.close()

    # --- the router's Loader --------------------------------------------------

    def _lazy(self) -> dict[str, InstanceConfig]:
        return {n: c for n, c in self.sup.configs().items() if c.on_demand is not None}

    def models(self) -> set[str]:
        return {cfg.alias_or(name) for name, cfg in self._lazy().items()}

    def idle(self, name: str) -> None:
        if self._waiting:  # a start waits for room: this one may be a victim now
            self._notify()

    def wake(self, model: str) -> float | None:
        if self.held(model):  # it comes back when the script's lease ends
            return self.queue_timeout
        lazy = self._lazy()
        names = sorted(n for n, c in lazy.items() if serves(model, c.alias_or(n), c.tags))
        if not names:
            return None
        loads = {n: lazy[n].on_demand.load_timeout for n in names}  # type: ignore[union-attr]
        for name in names:  # one already on its way (or coming back: a restart pending)
            if name in self.starting or name in self.stopping or self.sup.active(name):
                return loads[name]
        name = names[0]
        self.starting.add(name)
        self._tasks.start(partial(self._bring_up, name, model))
        return loads[name]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # --- starting ---------------------------------------------------------------

    async def _bring_up(self, name: str, model: str) -> None:
        cfg = self._lazy()[name]
        assert cfg.on_demand is not None
        store = self.sup.store
        deadline = self.fx.now() + cfg.on_demand.load_timeout
        said_wait = False
        try:
            while True:
                changed = self._changed
                plan = await self._plan(name)
                if plan.wait is None:
                    if any(self.slots.busy(v) for v, _ in plan.stop):
                        await self.fx.sleep(0)  # a request reached one meanwhile: plan again,
                        continue  # after letting the loop run (never a busy spin)
                    for victim, _ in plan.stop:  # no request reaches them from now on
                        self.sup.runner(victim).drain()
                        self.stopping.add(victim)
                    break
                if not said_wait:
                    store.add_event(name, "on_demand_wait", f"waiting to start: {plan.wait}")
                    said_wait = True
                left = deadline - self.fx.now()
                if left <= 0:
                    self._give_up(name, cfg, f"'{model}' cannot start: {plan.wait}.")
                    return
                self._waiting += 1
                try:
                    await changed_within(self.fx, changed, min(left, 1.0))
                finally:
                    self._waiting -= 1
            for victim, reason in plan.stop:
                store.add_event(victim, "swapped_out", reason, {"for": name})
                await self._stop(victim)
            store.add_event(
                name, "on_demand_start", f"started for a request to '{model}'", {"model": model}
            )
            # eager: requests wait, so the end of the load is noticed at once
            await self.sup.up([name], eager=True)
            used = {name: self.fx.now()}
            self.slots.last_used.update(used)
            await self.fx.mark_used(used)  # recorded before any request is answered
            self._written.update(used)
            runner = self.sup.runner(name)  # loading; the router's queue waits for it
            left = max(0.0, deadline - self.fx.now())

            # ended, not merely inactive: its last_exit is what the queue is told
            # (CI once said "the server stopped." when this looked in between)
            if not await runner.until(lambda r: r.healthy or r.ended, left):
                return  # the queued requests time out with 503 themselves
            if not runner.healthy:
                row = store.get(name)
                how = exit_text(row.last_exit) if row and row.last_exit else "stopped"
                self._give_up(name, cfg, f"'{model}' failed to start: the server {how}.")
        except OrchError as exc:
            store.add_event(name, "start_failed", f"on-demand start: {exc}")
            self._give_up(name, cfg, f"'{model}' cannot start: {exc}")
        finally:
            self.starting.discard(name)
            self._notify()  # no longer busy: a start waiting for room may go on

    def _give_up(self, name: str, cfg: InstanceConfig, message: str) -> None:
        self.slots.refuse_waiting(offered_names({name: cfg}), message)

    async def _plan(self, name: str) -> StartPlan:
        """What to stop for `name` to start: the facts (rows, slots, model
        files, the GPUs) gathered, the decision `plan_start`'s."""
        configs = self.sup.configs()
        rows = {r.name: r for r in self.sup.store.all()}
        members = []
        for n, cfg in configs.items():
            row = rows.get(n)
            running = row is not None and row.state in RUNNING_STATES
            devices = row.gpu_devices if running and row and row.gpu_devices else None
            members.append(
                Member(
                    n,
                    on_demand=cfg.on_demand is not None,
                    running=running and n not in self.stopping,
                    # loading (or failing its checks) counts as busy: never a victim
                    busy=self.slots.busy(n)
                    or n in self.starting
                    or (running and not self.sup.healthy(n)),
                    last_used=self.slots.last_used.get(n, (row.started_at if row else 0) or 0),
                    demand=await self._demand(cfg, n, devices) if running or n == name else {},
                    group=cfg.on_demand.group if cfg.on_demand else None,
                )
            )
        target = next(m for m in members if m.name == name)
        if not target.demand:
            return plan_start(target, members, {}, None, self.max_running)
        gpus = await self.fx.gpus()
        members = [  # every demand keyed by the cards' own indices, whatever the backend
            replace(m, demand=on_cards(dict(m.demand), configs[m.name].gpu.backend, gpus))
            for m in members
        ]
        target = next(m for m in members if m.name == name)
        total = {g.index: g.memory_total_mib * MIB for g in gpus}
        free = {g.index: g.memory_free_mib * MIB for g in gpus}
        return plan_start(target, members, total, free, self.max_running)

    async def _demand(
        self, cfg: InstanceConfig, name: str, devices: list[int] | None
    ) -> dict[int, int]:
        """Bytes per device (`devices`: where it actually runs, for `auto`)."""
        if devices:
            cfg = cfg.model_copy(deep=True)
            cfg.gpu.device_id = devices
        if not cfg.gpu.devices or cfg.gpu.vram_mib is not None:
            return demand(cfg, None)
        path: Path = model_file(cfg.model.path, self.sup.home.config_path(name).parent)
        try:
            info = await self.fx.model(path)
        except (ModelError, OSError):
            return {}
        return demand(cfg, info)

    # --- stopping ---------------------------------------------------------------

    async def _stop(self, name: str) -> None:
        """Stop `name` (marked stopping and draining by the caller, so no new
        request reaches it), then start whatever requests now wait for."""
        try:
            await self.sup.down([name])
        finally:
            self.stopping.discard(name)
            self._notify()
        for model in self.slots.waiting_models():
            self.wake(model)

    async def _loop(self) -> None:
        """Idle stops, and the last-used times `ps` and the dashboard show."""
        while True:
            await self.fx.sleep(TICK)
            try:
                used = self._tick()
                if used:  # an fsync: not on the loop the router runs on
                    await self.fx.mark_used(used)
                    self._written.update(used)
            except Exception:  # never take the daemon down
                log.exception("on-demand housekeeping failed")

    def _tick(self) -> dict[str, float]:
        """Start the idle stops that are due; the last-used times to write."""
        now = self.fx.now()
        lazy = self._lazy()
        members = []
        for name in lazy:
            if not self.sup.watching(name) or name in self.stopping:
                continue
            busy = self.slots.busy(name) or name in self.starting
            if busy:
                self.slots.last_used[name] = now  # used now: the idle clock waits
            last = self.slots.last_used.setdefault(name, now)  # first seen: counts from now
            members.append(Member(name, on_demand=True, running=True, busy=busy, last_used=last))
        ttl = {n: c.on_demand.idle_ttl for n, c in lazy.items() if c.on_demand}
        for name in idle_due(members, ttl, now):
            self.sup.store.add_event(
                name,
                "idle_stop",
                f"no request for {ttl[name]:g}s: stopping",
                {"idle_ttl": ttl[name]},
            )
            self.sup.runner(name).drain()  # at once: no request may reach it any more
            self.stopping.add(name)
            self._tasks.start(partial(self._stop, name))
        for model in self.slots.waiting_models():  # e.g. after a user's `down`
            if not candidates(model, self.slots.replicas()):
                self.wake(model)
        return {
            m.name: m.last_used
            for m in members
            if abs(m.last_used - self._written.get(m.name, 0.0)) >= WRITE_EVERY
        }
