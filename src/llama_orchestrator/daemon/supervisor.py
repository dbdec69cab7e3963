"""The supervisor: the daemon's asyncio shell around the engine and the pure
policy (DESIGN §4, §5).

For each instance it supervises it keeps one `Slot`: a lock that serialises
everything done to that instance (a user's up/down, a death, a health verdict,
a restart), the process it watches, the running health-check task and the
pending restart timer. Decisions come from `engine.policy` (`after_probe`,
`after_exit`); state changes go through the engine and the store, so every
transition is an event and survives a crash of ours.

Deaths are seen at once: on Linux through a pidfd registered with the event
loop (for any process, also one adopted from an earlier daemon), elsewhere by a
thread blocked in wait(). Blocking work (spawning, stopping, probing) runs in
worker threads, each with an engine (and SQLite connection) of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from llama_orchestrator import platform
from llama_orchestrator.config import InstanceConfig, load_config
from llama_orchestrator.engine import health
from llama_orchestrator.engine.lifecycle import Engine, UpResult
from llama_orchestrator.engine.policy import Ending, RestartBook, after_exit, after_probe
from llama_orchestrator.engine.process import ProcRef, find, stop_tree, wait_exit
from llama_orchestrator.errors import OrchError, StartFailed
from llama_orchestrator.home import Home
from llama_orchestrator.router.balance import Replica
from llama_orchestrator.states import RUNNING_STATES, Desired
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store import InstanceRow
from llama_orchestrator.validate import load_all, offered_names

if TYPE_CHECKING:
    from llama_orchestrator.router.proxy import Router

__all__ = ["Supervisor", "HealthHook", "EventHook"]

T = TypeVar("T")

#: a starting instance is probed first after 50 ms, then at intervals growing
#: by a quarter up to 0.5 s (never beyond `interval`), so `up --wait` returns
#: soon after a small model loads without probing a big one 20 times a second
START_PROBE_FIRST = 0.05
START_PROBE_MAX = 0.5
HOUSEKEEPING_INTERVAL = 5.0  # log rotation, GPU alerts

#: hook(name, result) after every health check (the metrics use it)
HealthHook = Callable[[str, health.ProbeResult], None]
#: hook(instance, kind, message, data) after every event recorded (daemon.log)
EventHook = Callable[[Any, str, str, dict[str, Any]], None]

log = logging.getLogger("llama_orchestrator.daemon")


@dataclass
class Slot:
    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ref: ProcRef | None = None  # the process being watched
    failures: int = 0  # consecutive failed health checks
    unhealthy_stop: bool = False  # we are stopping it for failing its health checks
    last_deep: float = 0.0  # monotonic time of the last completion probe
    health_task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    exit_fd: int | None = None

    def close_exit_fd(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.exit_fd is not None:
            loop.remove_reader(self.exit_fd)
            os.close(self.exit_fd)
            self.exit_fd = None

    def quiet(self, loop: asyncio.AbstractEventLoop) -> None:
        """Forget the watched process: no health checks, no restart pending."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.health_task is not None and self.health_task is not asyncio.current_task():
            self.health_task.cancel()
        self.health_task = None
        self.close_exit_fd(loop)
        self.ref = None
        self.failures = 0
        self.unhealthy_stop = False


class Supervisor:
    def __init__(
        self,
        home: Home,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_health: HealthHook | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        self.home = home
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_health = on_health
        self.on_event = on_event
        self.engine = self._new_engine()  # the loop thread's own
        self.slots: dict[str, Slot] = {}
        self._local = threading.local()
        self._housekeeping: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: healthy instances, as the router sees them (kept by the health checks)
        self.replicas: dict[str, Replica] = {}
        #: the router, when the daemon runs one: drained before a stop, woken on changes
        self.router: Router | None = None
        #: every alias and `tags:` name the configs offer (refreshed off the loop)
        self._known: set[str] = set()
        #: the valid configs as last read (with `_known`)
        self.configs: dict[str, InstanceConfig] = {}
        #: starting instances requests wait for (on demand): probed every 50 ms
        self.eager: set[str] = set()

    # --- plumbing -----------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "start() first"
        return self._loop

    def _new_engine(self) -> Engine:
        eng = Engine(self.home, clock=self.clock, supervisor=True)
        eng.store.on_event = self.on_event
        return eng

    def _worker_engine(self) -> Engine:
        eng = getattr(self._local, "engine", None)
        if eng is None:
            eng = self._local.engine = self._new_engine()
        return eng

    async def in_thread(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) in a worker thread with that thread's own engine."""
        return await asyncio.to_thread(lambda: fn(self._worker_engine()))

    def slot(self, name: str) -> Slot:
        if name not in self.slots:
            self.slots[name] = Slot(name)
        return self.slots[name]

    def _config(self, name: str) -> InstanceConfig | None:
        """The instance's config as it is now on disk (one file), or None."""
        try:
            return load_config(self.home.config_path(name))
        except OrchError:
            return None

    def supervised(self) -> list[str]:
        """Names of the instances with a process or a restart in our care."""
        return sorted(n for n, s in self.slots.items() if s.ref is not None or s.timer is not None)

    # --- start: adopt what runs, resume what was pending ----------------------

    async def start(self) -> None:
        """Reconcile: adopt every instance that still runs (pid + create_time),
        resume pending restarts, and start the instances that should run but
        do not (desired `running`, e.g. after a reboot, or `autostart`)."""
        self._loop = asyncio.get_running_loop()
        rows = await self.in_thread(lambda e: e.rows())
        await self._refresh_known()
        configs = self.configs
        to_start = []
        for row in rows:
            cfg = configs.get(row.name)
            async with self.slot(row.name).lock:
                if row.state in RUNNING_STATES:  # alive: rows() recorded the dead
                    await self._adopt(row)
                elif row.state == S.FAILED:
                    continue  # stays down until the user's up or restart
                elif row.desired == Desired.RUNNING and row.state == S.BACKOFF:
                    self._schedule(row.name, row.next_restart_at or self.clock())
                elif cfg is not None and cfg.on_demand:
                    continue  # the router starts it when a request names it
                elif row.desired == Desired.RUNNING or (cfg is not None and cfg.autostart):
                    to_start.append(row.name)
        for name in to_start:  # one by one: a broken config must not stop the others
            try:
                await self.up([name])
            except OrchError as exc:
                self.engine.store.add_event(name, "start_failed", f"daemon start: {exc}")
        self._housekeeping = asyncio.create_task(self._housekeep())

    async def _adopt(self, row: InstanceRow) -> None:
        ref = ProcRef(row.pid, row.create_time) if row.pid and row.create_time else None
        if ref is None:
            return
        store = self.engine.store
        with store.transaction():
            row.supervised = True
            store.save(row)
            store.add_event(
                row.name,
                "adopted",
                f"daemon {os.getpid()} adopted process {row.pid}",
                {"pid": row.pid},
            )
        if row.state == S.STOPPING or row.desired == Desired.STOPPED:
            # a `down` was under way when the last daemon died: finish it
            await self.in_thread(lambda e: e.down([row.name]))
            return
        self._watch(row.name, ref)

    # --- user operations (the control API calls these) ------------------------

    async def up(self, names: list[str], strict: bool = False) -> list[UpResult]:
        """Validate all, then start each (or take over one already running)."""
        prepared = await self.in_thread(lambda e: e.prepare(names, strict))
        results = []
        for p in prepared:
            slot = self.slot(p.name)
            async with slot.lock:
                result = await self.in_thread(partial(Engine.spawn, p=p, fresh=True))
                result.warnings, result.notes = p.warnings, p.notes
                if result.outcome == "started" or slot.ref is None:
                    slot.quiet(self.loop)
                    row = self.engine.store.get_or_new(p.name)
                    if row.pid and row.create_time:
                        self._watch(p.name, ProcRef(row.pid, row.create_time))
            results.append(result)
        await self._refresh_known()
        return results

    async def down(self, names: list[str], timeout: float | None = None) -> list[str]:
        async def one(name: str) -> list[str]:
            slot = self.slot(name)
            async with slot.lock:
                if self.router is not None and name in self.replicas:
                    cfg = self._config(name)  # drain: no new requests, in-flight ones finish
                    grace = timeout if timeout is not None else (cfg.stop_timeout if cfg else 10.0)
                    await self.router.drain(name, grace)
                slot.quiet(self.loop)
                self._set_replica(name, None)
                try:
                    return await self.in_thread(lambda e: e.down([name], timeout))
                finally:
                    if self.router is not None:
                        self.router.undrain(name)

        stopped = await asyncio.gather(*(one(n) for n in names))
        return [n for part in stopped for n in part]

    async def restart(
        self, names: list[str], rolling: bool = False, timeout: float = 300
    ) -> list[UpResult]:
        """Stop and start again. `rolling`: one at a time, each drained first and
        healthy again before the next, so replicas keep serving throughout."""
        await self.in_thread(lambda e: e.prepare(names))  # refuse a broken config first
        if not rolling:
            await self.down(names)
            return await self.up(names)
        results = []
        for name in names:
            await self.down([name])
            (result,) = await self.up([name])
            deadline = time.monotonic() + timeout
            while name not in self.replicas:
                row = self.engine.store.get(name)
                if row is None or row.state not in RUNNING_STATES or time.monotonic() > deadline:
                    raise StartFailed(
                        f"Rolling restart stopped at '{name}': it did not become healthy "
                        f"({row.state if row else 'gone'}); the replicas after it were not touched.",
                        hint=f"See `llama-orch describe {name}`.",
                    )
                await asyncio.sleep(0.05)
            result.healthy = True
            results.append(result)
        return results

    async def rm(self, name: str, force: bool) -> None:
        slot = self.slot(name)
        async with slot.lock:
            await self.in_thread(lambda e: e.rm(name, force))
            slot.quiet(self.loop)
            self._set_replica(name, None)
        self.slots.pop(name, None)

    async def shutdown(self, stop_instances: bool) -> None:
        """Stop supervising. The instances keep running (a later daemon adopts
        them) unless `stop_instances`."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if stop_instances:
            await self.down([r.name for r in self.engine.rows() if r.state in RUNNING_STATES])
        for slot in self.slots.values():
            slot.quiet(self.loop)
        self.replicas.clear()
        store = self.engine.store
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

    # --- watching processes ---------------------------------------------------

    def _watch(self, name: str, ref: ProcRef) -> None:
        """Learn of the process's end at once, and start its health checks."""
        slot = self.slot(name)
        slot.ref, slot.failures, slot.unhealthy_stop = ref, 0, False
        fd = platform.exit_fd(ref.pid)
        if fd is not None:
            slot.exit_fd = fd
            self.loop.add_reader(fd, self._exit_seen, name, ref)
        else:
            waiter = threading.Thread(
                target=self._wait_in_thread, args=(name, ref), daemon=True, name=f"wait-{name}"
            )
            waiter.start()
        if find(ref) is None:  # ended before the watch began (or the pid is reused)
            self._exit_seen(name, ref)
            return
        slot.health_task = asyncio.create_task(self._health_loop(name, ref))

    def _wait_in_thread(self, name: str, ref: ProcRef) -> None:
        wait_exit(ref)
        with contextlib.suppress(RuntimeError):  # the loop closed: the daemon is exiting
            self.loop.call_soon_threadsafe(self._exit_seen, name, ref)

    def _exit_seen(self, name: str, ref: ProcRef) -> None:
        slot = self.slots.get(name)
        if slot is None or slot.ref != ref:
            return  # an old process of this instance, already handled
        slot.close_exit_fd(self.loop)
        asyncio.create_task(self._on_exit(name, ref))

    async def _on_exit(self, name: str, ref: ProcRef) -> None:
        slot = self.slot(name)
        async with slot.lock:
            if slot.ref != ref:
                return  # a down or restart dealt with it meanwhile
            unhealthy = slot.unhealthy_stop
            slot.quiet(self.loop)
            self._set_replica(name, None)
            row = self.engine.store.get(name)
            if row is None or row.pid != ref.pid:
                return
            # records exit code, signal and stderr tail; in a thread, as reaping
            # a process whose threads are still exiting may take a moment
            row = await self.in_thread(partial(Engine.observe, row=row))
            if row.state == S.EXITED:
                ending = Ending(unhealthy=True) if unhealthy else Ending.of(row.last_exit)
                self._decide(row, ending)

    def _decide(self, row: InstanceRow, ending: Ending) -> None:
        """Apply the restart policy to a run that ended; schedule the restart."""
        cfg = self._config(row.name)
        if cfg is None:
            return  # no (valid) config any more: nothing to restart it with
        book = RestartBook(row.restarts, row.streak, row.started_at)
        now = self.clock()
        d = after_exit(
            cfg.restart_policy, book, ending, row.desired, now, self.rng.uniform(-1.0, 1.0)
        )
        self.engine.store.set_state(
            row,
            d.state,
            d.reason,
            {"restarts": d.book.restarts, "restart_at": d.restart_at},
            restarts=d.book.restarts,
            streak=d.book.streak,
            next_restart_at=d.restart_at,
        )
        if d.restart_at is not None:
            self._schedule(row.name, d.restart_at)

    def _schedule(self, name: str, at: float) -> None:
        slot = self.slot(name)
        if slot.timer is not None:
            slot.timer.cancel()
        delay = max(0.0, at - self.clock())
        slot.timer = self.loop.call_later(
            delay, lambda: asyncio.create_task(self._restart_due(name))
        )

    async def _restart_due(self, name: str) -> None:
        slot = self.slot(name)
        async with slot.lock:
            slot.timer = None
            row = self.engine.store.get(name)
            if row is None or row.state != S.BACKOFF or row.desired != Desired.RUNNING:
                return
            try:
                prepared = await self.in_thread(lambda e: e.prepare([name]))
                result = await self.in_thread(lambda e: e.spawn(prepared[0], fresh=False))
            except OrchError as exc:  # config broken meanwhile, port taken, ...
                row = self.engine.store.get_or_new(name)
                self.engine.store.add_event(name, "start_failed", str(exc))
                self._decide(row, Ending())
                return
            row = self.engine.store.get_or_new(name)
            if result.outcome == "started" and row.pid and row.create_time:
                self._watch(name, ProcRef(row.pid, row.create_time))

    # --- health -------------------------------------------------------------

    async def _health_loop(self, name: str, ref: ProcRef) -> None:
        cfg = self._config(name)
        if cfg is None:
            return
        hc, host, port = cfg.healthcheck, cfg.server.host, cfg.server.port
        slot = self.slot(name)
        state = S.STARTING
        start_pause = START_PROBE_FIRST
        counted = time.monotonic()  # the last probe whose failure counted (or the start)
        while True:
            if state == S.STARTING:
                pause = START_PROBE_FIRST if name in self.eager else min(hc.interval, start_pause)
                start_pause = min(START_PROBE_MAX, start_pause * 1.25)
            else:
                pause = hc.interval
            await asyncio.sleep(pause)
            result = await health.aprobe(host, port, hc.timeout)
            if (
                result.ok
                and state == S.HEALTHY  # a deep check of a server that was healthy before
                and hc.probe == "completion"
                and time.monotonic() - slot.last_deep >= hc.deep_interval
            ):
                slot.last_deep = time.monotonic()
                result = await health.aprobe(host, port, hc.timeout, True, cfg.server.api_key)
            now = time.monotonic()
            early = state == S.STARTING and now - counted < hc.interval
            if not early:
                counted = now
            if self.on_health is not None:
                self.on_health(name, result)
            async with slot.lock:
                if slot.ref != ref:
                    return
                row = self.engine.store.get(name)
                if row is None or row.pid != ref.pid or row.state not in RUNNING_STATES:
                    return
                v = after_probe(
                    hc,
                    cfg.restart_policy.effective_mode,
                    row.desired,
                    row.state,
                    slot.failures,
                    result.status,
                    self.clock() - (row.started_at or self.clock()),
                    result.error or "",
                    early,
                )
                slot.failures = v.failures
                if v.state != row.state:
                    self.engine.store.set_state(row, v.state, v.reason, {"probe": result.to_json()})
                state = v.state
                self._set_replica(name, cfg if v.state == S.HEALTHY else None)
                if v.restart:
                    slot.unhealthy_stop = True
            if v.restart:  # the exit handler applies the policy once it is gone
                await asyncio.to_thread(stop_tree, ref, cfg.stop_timeout)
                return

    # --- housekeeping -----------------------------------------------------------

    async def _housekeep(self) -> None:
        """Rotate the logs of running instances; record GPU alerts; re-read the
        model names the configs offer."""
        from llama_orchestrator.engine import views

        last_gpu = 0.0
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            try:
                await self._refresh_known()
                running = [n for n, s in self.slots.items() if s.ref is not None]
                await self.in_thread(partial(_rotate_all, names=running))
                interval = self.engine.settings.gpu.sample_interval
                if time.monotonic() - last_gpu >= interval:
                    last_gpu = time.monotonic()
                    await self.in_thread(views.pinned_gpu_warnings)
            except Exception:  # housekeeping must never take the daemon down
                log.exception("housekeeping failed")

    # --- what the router sees --------------------------------------------------

    def _set_replica(self, name: str, cfg: InstanceConfig | None) -> None:
        """Healthy (cfg given) or not: keep `replicas` and wake the router's queues."""
        if cfg is None:
            if self.replicas.pop(name, None) is None:
                return
        else:
            replica = Replica(
                name=name,
                alias=cfg.alias_or(name),
                tags=tuple(cfg.tags),
                host=health.probe_host(cfg.server.host),
                port=cfg.server.port,
                slots=cfg.server.parallel,
                api_key=cfg.server.api_key,
            )
            if self.replicas.get(name) == replica:
                return
            self.replicas[name] = replica
        if self.router is not None:
            self.router.wake()

    def known_models(self) -> set[str]:
        """What the router may answer 503 (known) rather than 404 for: read on
        every request, so it is a cached set, refreshed at start, after each
        up and by housekeeping, in a worker thread."""
        return self._known

    async def _refresh_known(self) -> None:
        loaded = await asyncio.to_thread(load_all, self.home)
        self.configs = {x.name: x.config for x in loaded if x.config is not None}
        self._known = offered_names(self.configs)

    def status(self) -> dict[str, Any]:
        return {"instances": self.supervised()}


def _rotate_all(engine: Engine, names: list[str]) -> None:
    for name in names:
        engine.rotate_logs(name)
