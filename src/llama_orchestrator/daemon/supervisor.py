"""The supervisor: the fleet of instance runners of one daemon (DESIGN §4, §5).

It holds one `InstanceRunner` per instance (made on first use) and turns the
control API's operations into commands to them: `up` validates every name
first (all or nothing, VRAM counted across them) and then starts each;
`down` stops them in parallel; a rolling restart does one at a time and
waits, by subscription, until each is healthy again. At its start it
reconciles: adopts what still runs, resumes pending restarts, and starts
what should run but does not (desired `running` after a reboot, `autostart`).

It never touches a process itself; everything goes through the runners and
the `Effects` they share.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.config.validate import offered_names
from llama_orchestrator.daemon.commands import Adopt, Remove, Resume, Start, Stop
from llama_orchestrator.daemon.runner import InstanceRunner, RunnerDeps
from llama_orchestrator.daemon.tasks import OwnedTasks
from llama_orchestrator.daemon.upstreams import Upstreams
from llama_orchestrator.engine.results import UpResult
from llama_orchestrator.engine.status import StatusReply, with_loads, with_upstreams
from llama_orchestrator.errors import OrchError, StartFailed
from llama_orchestrator.gpus.leases import refuse_leased
from llama_orchestrator.home import Home
from llama_orchestrator.states import RUNNING_STATES, Desired
from llama_orchestrator.states import InstanceState as S

__all__ = ["Supervisor", "HOUSEKEEPING_INTERVAL"]

HOUSEKEEPING_INTERVAL = 5.0  # log rotation, GPU alerts, the names configs offer
STATE_WRITE_INTERVAL = 1.0  # what a full disk refused, written once it has room

log = logging.getLogger("llama_orchestrator.daemon")


class Supervisor:
    def __init__(self, home: Home, deps: RunnerDeps, upstreams: Upstreams | None = None) -> None:
        self.home = home
        self.deps = deps
        self.store = deps.store
        self.effects = deps.effects
        self._runners: dict[str, InstanceRunner] = {}
        self._configs: dict[str, InstanceConfig] = {}
        #: the external upstreams the daemon checks (shown by `ps`)
        self.upstreams = upstreams
        self._tasks = OwnedTasks("supervisor", sleep=deps.effects.sleep)  # housekeeping

    # --- runners --------------------------------------------------------------

    def runner(self, name: str) -> InstanceRunner:
        """The runner of `name` (made and started on first use)."""
        r = self._runners.get(name)
        if r is None:
            r = self._runners[name] = InstanceRunner(name, self.deps)
            r.start()
        return r

    def active(self, name: str) -> bool:
        """A process of `name` is in our care, or a restart of it is pending."""
        r = self._runners.get(name)
        return r is not None and r.active

    def watching(self, name: str) -> bool:
        """A process of `name` is in our care (no restart merely pending)."""
        r = self._runners.get(name)
        return r is not None and r.watching

    def healthy(self, name: str) -> bool:
        r = self._runners.get(name)
        return r is not None and r.healthy

    def state_of(self, name: str) -> S | None:
        """What the runner of `name` last recorded (None: no runner yet)."""
        r = self._runners.get(name)
        return r.state if r is not None else None

    def supervised(self) -> list[str]:
        return sorted(n for n, r in self._runners.items() if r.active)

    def configs(self) -> dict[str, InstanceConfig]:
        """The valid configs as last read (at start, after each up, by housekeeping)."""
        return self._configs

    # --- start: adopt what runs, resume what was pending ----------------------

    async def start(self) -> None:
        """Reconcile desired and actual state (see the module docstring)."""
        await self.effects.rows()  # the dead recorded as such
        await self.refresh()
        await self._orphans()
        rows = await self.effects.rows()
        to_start = []
        for row in rows:  # one by one: one instance's trouble must not stop the others
            cfg = self._configs.get(row.name)
            try:
                if row.state in RUNNING_STATES:
                    await self.runner(row.name).ask(Adopt(row))
                elif row.state == S.FAILED:
                    continue  # stays down until the user's up or restart
                elif row.desired == Desired.RUNNING and row.state == S.BACKOFF:
                    at = row.next_restart_at or self.effects.now()
                    await self.runner(row.name).ask(Resume(at))
                elif cfg is not None and cfg.on_demand:
                    if row.state == S.QUEUED:  # its requests went with the last daemon
                        await self.runner(row.name).ask(Stop())
                    continue  # the router starts it when a request names it
                elif row.desired == Desired.RUNNING or (cfg is not None and cfg.autostart):
                    to_start.append(row.name)
            except OrchError as exc:
                log.error(f"{row.name}: not taken over at daemon start: {exc}")
        for name in to_start:
            try:
                await self.up([name])
            except OrchError as exc:  # a broken config, a port taken meanwhile, ...
                self.store.add_event(name, "start_failed", f"daemon start: {exc}")
        self._tasks.start(self._housekeep, key="housekeeping", renew_after=STATE_WRITE_INTERVAL)

    async def _orphans(self) -> None:
        """This home's llama-server processes that no row owns (a daemon killed
        between a spawn and its record): adopted when they run what the
        config says now, else stopped; an event says which, either way."""
        for name, ref, argv in await self.effects.orphans():
            cfg = self._configs.get(name)
            row = self.store.get(name)
            why = "no instance of that name is configured"
            if cfg is not None and row is not None and row.state in RUNNING_STATES:
                why = f"the instance runs as process {row.pid}"
            elif cfg is not None:
                try:
                    (p,) = await self.effects.prepare([name])
                except OrchError as exc:
                    why = f"its config cannot start now ({exc.message})"
                else:
                    if p.launch.argv == argv:
                        await self.effects.record_found(name, ref, cfg.server.host, cfg.server.port)
                        continue  # adopted below, as any running row
                    why = "its config changed since it started"
            try:
                await self.effects.stop(ref, cfg.stop_timeout if cfg else 10.0)
            except Exception as exc:  # e.g. gone meanwhile, or not ours to stop
                log.warning(f"{name}: could not stop unrecorded process {ref.pid}: {exc}")
                continue
            self.store.add_event(
                name, "orphan_stopped", f"stopped process {ref.pid}, running unrecorded: {why}"
            )

    # --- user operations (the control API calls these) ------------------------

    async def up(
        self, names: list[str], strict: bool = False, eager: bool = False
    ) -> list[UpResult]:
        """Validate all, then start each (or take over one already running)."""
        prepared = await self.effects.prepare(names, strict)
        leases = self.store.leases()
        for p in prepared:
            refuse_leased(leases, p.name, p.devices)
        results = [await self.runner(p.name).ask(Start(p, eager=eager)) for p in prepared]
        # each was queued behind the ones before it: say where it stands among all
        positions = self.loads()
        for r in results:
            if r.outcome == "queued" and r.name in positions:
                r.load_position = positions[r.name]
        await self.refresh()
        return results

    async def down(self, names: list[str], timeout: float | None = None) -> list[str]:
        stopped = await asyncio.gather(*(self.runner(n).ask(Stop(timeout)) for n in names))
        return [n for n, was in zip(names, stopped, strict=True) if was]

    async def restart(
        self, names: list[str], rolling: bool = False, timeout: float = 300
    ) -> list[UpResult]:
        """Stop and start again. `rolling`: one at a time, each drained first and
        healthy again before the next, so replicas keep serving throughout."""
        await self.effects.prepare(names)  # refuse a broken config first
        if not rolling:
            await self.down(names)
            return await self.up(names)
        results = []
        for name in names:
            await self.down([name])
            (result,) = await self.up([name])
            r = self.runner(name)
            settled = await r.until(
                lambda r: r.healthy or (r.state not in RUNNING_STATES and not r.queued), timeout
            )
            if not (settled and r.healthy):
                raise StartFailed(
                    f"Rolling restart stopped at '{name}': it did not become healthy "
                    f"({r.state}); the replicas after it were not touched.",
                    hint=f"See `llama-orch describe {name}`.",
                )
            result.healthy = True
            results.append(result)
        return results

    async def rm(self, name: str, force: bool) -> None:
        await self.runner(name).ask(Remove(force))
        runner = self._runners.pop(name, None)
        if runner is not None:
            await runner.close()

    async def shutdown(self, stop_instances: bool) -> None:
        """Stop supervising. The instances keep running (a later daemon adopts
        them) unless `stop_instances`."""
        await self._tasks.close()
        if stop_instances:
            rows = await self.effects.rows()
            await self.down([r.name for r in rows if r.state in RUNNING_STATES])
        for runner in self._runners.values():
            await runner.close()
        store = self.store
        with store.transaction():
            for row in store.all():
                if row.supervised:
                    row.supervised = False
                    store.save(row)
            store.add_event(
                None,
                "daemon_stopped",
                f"daemon {os.getpid()} stopped",
                {"stopped_instances": stop_instances},
            )

    # --- housekeeping -----------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the configs, and the model names they offer (off the loop)."""
        self._configs = await self.effects.load_configs()
        self.deps.board.known = offered_names(self._configs)

    async def _housekeep(self) -> None:
        """Rotate the logs of running instances; record GPU alerts; re-read the
        model names the configs offer; and, every second, write what a full
        disk refused (nothing to do, and no I/O, while nothing is kept)."""
        ticks = 0
        while True:
            await self.effects.sleep(STATE_WRITE_INTERVAL)
            try:
                await self.effects.write_state()
            except Exception:
                log.exception("writing the kept state failed")
            ticks += 1
            if ticks * STATE_WRITE_INTERVAL < HOUSEKEEPING_INTERVAL:
                continue
            ticks = 0
            try:
                await self.refresh()
                await self.effects.rotate_logs([n for n, r in self._runners.items() if r.active])
                await self.effects.check_gpus()
            except Exception:  # housekeeping must never take the daemon down
                log.exception("housekeeping failed")

    def status(self) -> dict[str, Any]:
        kept = self.store.unsaved
        unsaved = None
        if kept and kept.error is not None:  # a full disk: what is kept in memory, since when
            unsaved = {"changes": kept.changes, "since": kept.since, "error": kept.error.message}
        return {"instances": self.supervised(), "state_unsaved": unsaved}

    def upstream_states(self) -> dict[str, dict[str, Any]]:
        """What the checks of the external upstreams found, by name."""
        if self.upstreams is None:
            return {}
        return {name: st.to_json() for name, st in self.upstreams.states.items()}

    def loads(self) -> dict[str, list[int]]:
        """The load queue: {name: [k, n]}, load k of the n loading or waiting."""
        return self.deps.loads.positions()

    def seen_here(self, reply: StatusReply) -> StatusReply:
        """The status view with what only the daemon knows: each loading or
        queued instance's place in the load queue (`load_position`), and a
        state the full disk keeps in memory."""
        with_loads(reply.instances, self.loads())
        with_upstreams(reply.instances, self.upstream_states())
        if unsaved := self.status()["state_unsaved"]:
            reply.warnings.append(
                f"{unsaved['error']} The daemon supervises from memory "
                f"({unsaved['changes']} changes not yet written)."
            )
        return reply
