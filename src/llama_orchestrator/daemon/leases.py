"""GPU leases for plans' script tasks (Whisper, embeddings, OCR: GPU work
that is not an LLM call).

A script task asks for cards (`"gpus": 1`, or `[2]`). The daemon leases it
cards no LLM is on; failing that, cards whose instances are idle and allowed
to yield (`"yield_to_scripts": true`): those are drained and stopped like
`down`, and started again when the lease ends (the task done, failed, timed
out or cancelled). Meanwhile nothing else starts on a leased card, and the
router holds requests for a yielded instance's model (`queue_timeout`) rather
than refusing them. Leases are rows of the state database: a daemon killed
mid-lease gives the cards back at its next start and restores what yielded
(the plan runner runs the task again, which asks anew).

The decisions are pure, in `gpus.leases`; `Leases` carries them out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llama_orchestrator.daemon.tasks import OwnedTasks
from llama_orchestrator.errors import OrchError
from llama_orchestrator.gpus.leases import Card, choose, lease_env, never, occupants
from llama_orchestrator.names import serves
from llama_orchestrator.store.database import Store
from llama_orchestrator.store.rows import Lease

if TYPE_CHECKING:
    from llama_orchestrator.daemon.supervisor import Supervisor
    from llama_orchestrator.gpus.discover import GpuInfo
    from llama_orchestrator.plans.spec import Task

__all__ = ["Leases", "REFRESH_S"]

log = logging.getLogger("llama_orchestrator.daemon")

#: how often the cards (and their free memory) are looked at again
REFRESH_S = 5.0


@dataclass
class Leases:
    """The daemon's leases: decided on the loop, kept in the state database."""

    sup: Supervisor
    busy: Callable[[str], bool]
    #: wakes the router's queues (a restored instance takes requests again)
    changed: Callable[[], None] = lambda: None
    #: the last discovery's cards (refreshed every REFRESH_S, off the loop)
    cards: list[GpuInfo] = field(default_factory=list)
    _tasks: OwnedTasks = field(default_factory=lambda: OwnedTasks("leases"))

    @property
    def store(self) -> Store:
        return self.sup.store

    async def start(self) -> None:
        """A previous daemon's leases: the cards given back, what yielded restored
        (their tasks run again: the plan runner requeues them, and they ask anew)."""
        by_task: dict[tuple[str, str], list[Lease]] = {}
        for x in self.store.leases():  # one task's cards go back together
            by_task.setdefault((x.run_id, x.task_id), []).append(x)
        for leases in by_task.values():
            await self.end(leases, "the daemon restarted")
        await self.refresh()
        self._tasks.start(self._refresh_often, renew_after=REFRESH_S)

    async def close(self) -> None:
        await self._tasks.close()

    async def refresh(self) -> None:
        try:
            self.cards = await self.sup.effects.gpus()
        except Exception:  # a GPU tool that fails: the cards known before stay
            log.exception("GPU discovery for the leases failed")

    async def _refresh_often(self) -> None:
        while True:
            await self.sup.effects.sleep(REFRESH_S)
            await self.refresh()

    def held(self) -> set[int]:
        return {x.gpu for x in self.store.leases()}

    def yielded(self) -> set[str]:
        return {n for x in self.store.leases() for n in x.yielded}

    def holds_for(self, model: str) -> bool:
        """A yielded instance serves `model`: requests for it wait for its return."""
        configs = self.sup.configs()
        return any(
            n in configs and serves(model, configs[n].alias_or(n), configs[n].tags)
            for n in self.yielded()
        )

    def _cards(self) -> list[Card]:
        configs = self.sup.configs()
        held = self.held()
        on = occupants(
            self.store.all(),
            lambda n: configs[n].gpu.devices if n in configs else [],
            lambda n: n in configs and configs[n].yield_to_scripts,
            self.busy,
        )
        return [
            Card(
                g.index,
                g.memory_total_mib,
                g.memory_free_mib,
                tuple(on.get(g.index, ())),
                g.index in held,
            )
            for g in self.cards
        ]

    def never(self, task: Task) -> str | None:
        """Why `task` can never get its cards on this machine (see `leases.never`)."""
        return never(task.gpus if task.gpus is not None else 1, (g.index for g in self.cards))

    def reserve(self, run_id: str, task: Task) -> list[Lease] | str:
        """Lease cards to `task` now (persisted as "yielding"), or why it waits."""
        want = task.gpus if task.gpus is not None else 1
        choice = choose(want, task.vram_mib, self._cards())
        if isinstance(choice, str):
            return choice
        now = self.sup.effects.now()
        leases = [
            Lease(g, run_id, task.id, now, "yielding", list(choice.yielded)) for g in choice.cards
        ]
        self.store.save_leases(leases)
        cards = ", ".join(map(str, choice.cards))
        self.store.add_event(
            None,
            "lease_granted",
            f"GPU {cards} leased to script task '{task.id}' of plan run {run_id}"
            + (f"; {', '.join(choice.yielded)} yield" if choice.yielded else ""),
            {
                "gpus": list(choice.cards),
                "run": run_id,
                "task": task.id,
                "yielded": list(choice.yielded),
            },
        )
        return leases

    async def begin(self, leases: list[Lease]) -> dict[str, str]:
        """Stop what yields (drained first, like `down`); the script's environment."""
        names = sorted({n for x in leases for n in x.yielded})
        for name in names:
            self.store.add_event(
                name,
                "instance_yielded",
                f"{name} stops for script task '{leases[0].task_id}' of plan run {leases[0].run_id}",
                {
                    "gpus": [x.gpu for x in leases],
                    "run": leases[0].run_id,
                    "task": leases[0].task_id,
                },
            )
        await self.sup.down(names)
        for x in leases:
            x.state = "active"
        self.store.save_leases(leases)
        return lease_env(x.gpu for x in leases)

    def keep_down(self, names: list[str]) -> None:
        """A user's `down` of instances that yielded: they stay down when the
        lease ends (it restores only what it stopped and nobody stopped since)."""
        changed = [x for x in self.store.leases() if set(x.yielded) & set(names)]
        for x in changed:
            x.yielded = [n for n in x.yielded if n not in names]
        self.store.save_leases(changed)

    async def end(self, mine: list[Lease], why: str) -> None:
        """Give one task's cards back and start again what yielded for them."""
        first = mine[0]
        # as recorded: a user's down meanwhile took an instance off the list
        stored = {x.gpu: x for x in self.store.leases()}
        names = sorted({n for x in mine for n in stored.get(x.gpu, x).yielded})
        self.store.drop_leases([x.gpu for x in mine])
        self.store.add_event(
            None,
            "lease_released",
            f"GPU {', '.join(str(x.gpu) for x in mine)} released by script task "
            f"'{first.task_id}' of plan run {first.run_id}: {why}",
            {"gpus": [x.gpu for x in mine], "run": first.run_id, "task": first.task_id},
        )
        configs = self.sup.configs()
        for name in names:
            if name not in configs:
                continue  # removed meanwhile: nothing to restore
            try:
                await self.sup.up([name])
            except OrchError as exc:
                self.store.add_event(name, "start_failed", f"restoring after a lease: {exc}")
                continue
            self.store.add_event(
                name, "instance_restored", f"{name} starts again: the GPU lease ended"
            )
        self.changed()
