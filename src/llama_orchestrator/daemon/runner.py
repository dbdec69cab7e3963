"""One owner per instance: the `InstanceRunner` (DESIGN §4, §5).

Inside the daemon each instance has one runner, an asyncio task that owns
its process, its state, its health checks and its restart timer, and is the
only writer of its row (the spawn effect records `starting` for it, in the
transaction that starts the process). Everything else (the control API,
the router's on-demand starts, a rolling restart, plans) sends it commands
and awaits the answers, or waits on its changes with `until`; nothing
reaches into it.

Commands are handled one at a time, so the state machine never races: a
user's `down`, a death, a health verdict and a restart cannot interleave.
The probe loop, the exit watch, the restart timer and the wait for a load
slot (`daemon.loads`) are tasks the runner owns; they only post messages to
it. Decisions are pure (`engine.step`, `engine.policy.after_exit`); every
effect goes through `Effects`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.config.prepare import Prepared
from llama_orchestrator.daemon.board import Board
from llama_orchestrator.daemon.commands import (
    Adopt,
    Command,
    Exited,
    LoadTurn,
    Probed,
    Remove,
    RestartDue,
    Resume,
    Start,
    Stop,
    StopFailed,
)
from llama_orchestrator.daemon.effects import Effects, changed_within
from llama_orchestrator.daemon.loads import LoadGate
from llama_orchestrator.daemon.tasks import OwnedTasks
from llama_orchestrator.engine import health
from llama_orchestrator.engine.policy import Ending, RestartBook, after_exit
from llama_orchestrator.engine.process import ProcRef
from llama_orchestrator.engine.results import UpResult, ended, running_rm_refused
from llama_orchestrator.engine.step import Watch, step
from llama_orchestrator.errors import DiskFull, NotYet, OrchError
from llama_orchestrator.router.balance import Replica
from llama_orchestrator.states import RUNNING_STATES, Desired
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.database import Store
from llama_orchestrator.store.rows import InstanceRow

__all__ = [
    "InstanceRunner",
    "RunnerDeps",
    "HealthHook",
    "START_PROBE_FIRST",
    "START_PROBE_MAX",
]

#: a starting instance is probed first after 50 ms, then at intervals growing
#: by a quarter up to 0.5 s (never beyond `interval`), so `up --wait` returns
#: soon after a small model loads without probing a big one 20 times a second
START_PROBE_FIRST = 0.05
START_PROBE_MAX = 0.5
#: how soon an owned task that failed (a watch, the checks) is made anew
TASK_RETRY_S = 1.0
#: how often a start the full disk refused is tried again
DISK_RETRY_S = 5.0

#: hook(name, result) after every health check (the metrics use it)
HealthHook = Callable[[str, health.ProbeResult], None]
#: wait (at most the seconds given) for the requests in flight on an instance to end
Settle = Callable[[str, float], Awaitable[None]]

log = logging.getLogger("llama_orchestrator.daemon")


@dataclass
class RunnerDeps:
    """What every runner of one daemon shares."""

    store: Store  # the loop thread's connection
    effects: Effects
    board: Board
    settle: Settle
    rng: random.Random = field(default_factory=random.Random)
    on_health: HealthHook | None = None
    loads: LoadGate = field(default_factory=LoadGate)


class InstanceRunner:
    def __init__(self, name: str, deps: RunnerDeps) -> None:
        self.name = name
        self._d = deps
        self._fx = deps.effects
        self._inbox: asyncio.Queue[tuple[Command, asyncio.Future[Any] | None]] = asyncio.Queue()
        row = deps.store.get(name)
        #: the row's state as this runner last wrote or read it
        self.state: S = row.state if row else S.CREATED
        self._ref: ProcRef | None = None  # the process being watched
        self._cfg: InstanceConfig | None = None  # the config of the run being watched
        self._watch: Watch | None = None
        self._eager = False
        self._draining = False
        self._unhealthy_stop = False  # we are stopping it for failing its checks
        # a stop for failing its checks failed: the next failed check tries again
        self._stop_owed = False
        self._room_wait = False  # a start waits for room on a full disk
        self._waiting: str | None = None  # why a start waits (`NotYet`), as last said
        #: a start waiting for a load slot: (fresh, eager), as its Start said
        self._queued: tuple[bool, bool] | None = None
        #: "probe", "exit", "restart", "stop", "load"
        self._tasks = OwnedTasks(name, sleep=deps.effects.sleep)
        self._due = 0  # the token of the restart timer that counts
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- what others may ask and see ------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"runner-{self.name}")

    async def ask(self, command: Command) -> Any:
        """Send a command and await its answer (or the exception it raised)."""
        future = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait((command, future))
        return await future

    def post(self, command: Command) -> None:
        self._inbox.put_nowait((command, None))

    @property
    def healthy(self) -> bool:
        return self.state == S.HEALTHY and self._ref is not None

    @property
    def watching(self) -> bool:
        """A process of it is in our care."""
        return self._ref is not None

    @property
    def active(self) -> bool:
        """A process of it is in our care, or a restart or a load is pending."""
        return self._ref is not None or "restart" in self._tasks or self.queued

    @property
    def ended(self) -> bool:
        """Nothing of it in our care, and its end recorded: the process is
        forgotten first and how it ended is read after (`_exited`)."""
        return not self.active and self.state not in RUNNING_STATES

    @property
    def queued(self) -> bool:
        """A start of it waits for a load slot."""
        return self._queued is not None

    def drain(self) -> None:
        """Take no new requests from now on (the process keeps running).
        Immediate, not queued: the caller checked that no request is in
        flight on it, and none may arrive between that check and this."""
        self._draining = True  # until the Stop that follows (it ends every drain)
        self._publish()
        self._notify()

    async def until(self, done: Callable[[InstanceRunner], bool], timeout: float) -> bool:
        """Wait until done(self) holds after some change, at most `timeout`
        seconds of the effects' clock; whether it holds."""
        deadline = self._fx.now() + timeout
        while not done(self):
            left = deadline - self._fx.now()
            if left <= 0 or not await changed_within(self._fx, self._changed, left):
                return done(self)
        return True

    async def close(self) -> None:
        """Stop supervising (the process keeps running); no answer will come.
        Its load slot is not given back: the daemon is going, and nothing
        else may start on the way."""
        self._quiet()
        self._tasks.cancel("load")
        self._d.board.publish(self.name, None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._inbox.empty():
            _, future = self._inbox.get_nowait()
            if future is not None and not future.done():
                future.cancel()

    # --- the loop ---------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            command, future = await self._inbox.get()
            try:
                answer = await self._handle(command)
            except asyncio.CancelledError:
                if future is not None and not future.done():
                    future.cancel()
                raise
            except Exception as exc:
                if future is not None and not future.done():
                    future.set_exception(exc)
                elif not isinstance(exc, OrchError):  # nobody to tell: never silently
                    log.exception(f"{self.name}: {type(command).__name__} failed")
                else:
                    log.warning(f"{self.name}: {exc}")
            else:
                if future is not None and not future.done():
                    future.set_result(answer)
            finally:
                self._notify()

    async def _handle(self, c: Command) -> Any:
        if isinstance(c, Probed):
            return self._probed(c)
        if isinstance(c, Exited):
            return await self._exited(c.ref)
        if isinstance(c, RestartDue):
            return await self._restart_due(c.token)
        if isinstance(c, StopFailed):
            return self._stop_failed(c)
        if isinstance(c, LoadTurn):
            return await self._load_turn()
        if isinstance(c, Start):
            return await self._start(c)
        if isinstance(c, Stop):
            return await self._stop(c.timeout)
        if isinstance(c, Adopt):
            return await self._adopt(c.row)
        if isinstance(c, Resume):
            return self._schedule(c.at)
        if isinstance(c, Remove):
            return await self._remove(c.force)
        raise TypeError(f"unknown command {c!r}")

    # --- state and what the router sees ---------------------------------------------

    def _row(self) -> InstanceRow:
        row = self._d.store.get_or_new(self.name)
        self.state = row.state
        return row

    def _set(
        self, row: InstanceRow, new: S, message: str, data: dict[str, Any] | None = None, **kw: Any
    ) -> InstanceRow:
        row = self._d.store.set_state(row, new, message, data, **kw)
        self.state = row.state
        return row

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _publish(self) -> None:
        cfg = self._cfg
        replica = None
        if self.healthy and not self._draining and cfg is not None:
            host, port, node = self._fx.address(self.name, cfg)
            replica = Replica(
                name=self.name,
                alias=cfg.alias_or(self.name),
                tags=tuple(cfg.tags),
                host=host,
                port=port,
                slots=cfg.server.parallel,
                api_key=cfg.server.api_key,
                node=node,
            )
        self._d.board.publish(self.name, replica)

    # --- owned tasks ------------------------------------------------------------------

    def _own(self, key: str, make: Callable[[], Awaitable[None]], again: bool = False) -> None:
        """Run make() as the task `key` (replacing one before). No task dies
        in silence: a failure is logged and, with `again`, the task is made
        anew a moment later (unless replaced or cancelled meanwhile: a new
        process replaces its watches)."""
        self._tasks.start(make, key=key, renew_after=TASK_RETRY_S if again else None)

    def _quiet(self) -> None:
        """Forget the watched process: no health checks, no restart pending."""
        for key in ("probe", "exit", "restart"):
            self._tasks.cancel(key)
        self._ref = None
        self._watch = None
        self._unhealthy_stop = self._stop_owed = False
        self._due += 1

    def _watch_process(self, ref: ProcRef, cfg: InstanceConfig | None, eager: bool) -> None:
        """Learn of the process's end at once, and start its health checks."""
        self._quiet()
        self._ref, self._cfg, self._eager = ref, cfg, eager
        self._watch = Watch(since=self._fx.now())

        async def exit_watch() -> None:
            await self._fx.watch_exit(ref)
            self.post(Exited(ref))

        self._own("exit", exit_watch, again=True)
        if cfg is not None:
            self._own("probe", lambda: self._probe_loop(ref, cfg), again=True)

    async def _probe_loop(self, ref: ProcRef, cfg: InstanceConfig) -> None:
        hc = cfg.healthcheck
        start_pause = START_PROBE_FIRST
        last_deep = self._fx.now()  # the first deep check after deep_interval of health
        while True:
            if self.state == S.STARTING:
                pause = START_PROBE_FIRST if self._eager else min(hc.interval, start_pause)
                start_pause = min(START_PROBE_MAX, start_pause * 1.25)
            else:
                pause = hc.interval
            await self._fx.sleep(pause)
            try:
                result = await self._fx.probe(self.name, cfg, False)
                if (
                    result.ok
                    and self.state == S.HEALTHY  # a deep check of a server healthy before
                    and hc.probe == "completion"
                    and self._fx.now() - last_deep >= hc.deep_interval
                ):
                    last_deep = self._fx.now()
                    result = await self._fx.probe(self.name, cfg, True)
                if result.status == health.LOCAL:  # counted by nobody, but said
                    log.warning(f"{self.name}: {result.error}; no verdict on the server")
                if self._d.on_health is not None:
                    self._d.on_health(self.name, result)
                loading = self.state == S.STARTING and not result.ok
                progress = await self._fx.load_progress(self.name, ref) if loading else None
                # one at a time: probes never pile up
                await self.ask(Probed(ref, result, progress))
            except Exception:  # a fault of ours: logged, and the checks go on
                log.exception(f"{self.name}: health check failed in the daemon")

    def _schedule(self, at: float) -> None:
        self._due += 1
        token = self._due

        async def timer() -> None:
            await self._fx.sleep(max(0.0, at - self._fx.now()))
            self.post(RestartDue(token))

        self._own("restart", timer)

    # --- the handlers -----------------------------------------------------------------

    def _took(self, result: UpResult, p: Prepared, eager: bool) -> None:
        """After a spawn: watch the new process (or the one already running
        that nobody watches yet)."""
        if result.outcome != "started" and self._ref is not None:
            self._eager = self._eager or eager
            return
        row = self._row()
        ref = ProcRef.of(row.pid, row.create_time)
        if ref is None and row.pid and row.state in RUNNING_STATES:
            # gone before its start time could be read (a model that fails at
            # once): watched all the same, so its end is seen and recorded now
            ref = ProcRef(row.pid, 0.0)
        if ref is not None:
            self._watch_process(ref, p.config, eager)

    async def _start(self, c: Start) -> UpResult:
        p = c.prepared
        if self._queued is not None:  # waiting already: as urgent as the latest ask
            fresh, eager = self._queued
            self._queued = (fresh or c.fresh, eager or c.eager)
            self._d.loads.enter(self.name, c.eager)
            return self._queued_result(p)
        row = self._row()
        holding = False  # a load slot taken for this spawn
        if self._ref is None and not self._fx.alive(ProcRef.of(row.pid, row.create_time)):
            turn = self._d.loads.enter(self.name, c.eager)
            if turn is not None:
                self._queue(row, turn, c.fresh, c.eager)
                return self._queued_result(p)
            holding = True
        result = await self._spawn(p, c.fresh, c.eager, holding)
        result.warnings, result.notes = p.warnings, [*p.notes, *result.notes]
        return result

    async def _spawn(self, p: Prepared, fresh: bool, eager: bool, holding: bool) -> UpResult:
        """Spawn `p` and watch the process; a load slot held for it (`holding`)
        is given back unless a load of ours began."""
        try:
            result = await self._fx.spawn(p, fresh)
        except NotYet as exc:  # not now, and not the server's fault: tried again later
            if holding:
                self._d.loads.leave(self.name)
            self._not_yet(exc)
            return UpResult(self.name, "waiting", None, p.config.server.port, notes=[exc.message])
        except BaseException:
            if holding:
                self._d.loads.leave(self.name)
            raise
        self._room_wait = False
        self._waiting = None
        self._took(result, p, eager)
        if holding and (self._ref is None or result.outcome != "started"):
            self._d.loads.leave(self.name)
        self._publish()
        return result

    def _queued_result(self, p: Prepared) -> UpResult:
        return UpResult(
            self.name,
            "queued",
            None,
            p.config.server.port,
            warnings=p.warnings,
            notes=p.notes,
            load_position=self._d.loads.position(self.name),
        )

    def _queue(
        self, row: InstanceRow, turn: asyncio.Future[None], fresh: bool, eager: bool
    ) -> None:
        """Wait for a load slot (`daemon.loads`): `queued` until the turn comes."""
        self._tasks.cancel("restart")
        self._due += 1
        self._queued = (fresh, eager)
        k, n = self._d.loads.position(self.name) or [0, 0]
        self._set(
            row,
            S.QUEUED,
            f"waiting for its turn to load (load {k} of {n})",
            {"load_position": [k, n]},
            desired=Desired.RUNNING,
            next_restart_at=None,
        )

        async def wait() -> None:
            await turn
            self.post(LoadTurn())

        self._own("load", wait)

    def _unqueue(self) -> None:
        """Hold no load slot and wait for none (stopped, removed, loaded, dead)."""
        self._tasks.cancel("load")
        self._queued = None
        self._d.loads.leave(self.name)

    async def _load_turn(self) -> None:
        if self._queued is None:
            return  # stopped meanwhile: the stop gave the slot back
        fresh, eager = self._queued
        self._queued = None
        self._tasks.forget("load")
        row = self._row()
        if row.state != S.QUEUED or row.desired != Desired.RUNNING:
            self._d.loads.leave(self.name)
            return
        await self._launch(fresh, eager)

    async def _restart_due(self, token: int) -> None:
        if token != self._due:
            return  # a later command replaced this timer
        self._tasks.forget("restart")
        row = self._row()
        if row.state != S.BACKOFF or row.desired != Desired.RUNNING:
            return
        turn = self._d.loads.enter(self.name)
        if turn is not None:
            self._queue(row, turn, False, False)
            return
        await self._launch(False, False)

    async def _launch(self, fresh: bool, eager: bool) -> None:
        """Start a run nobody awaits (a restart, a start whose turn to load
        came), holding a load slot: prepared anew (the config may have changed,
        `auto` picks a card by what is free now); a failure is recorded, and
        the restart policy decides what follows."""
        try:
            (p,) = await self._fx.prepare([self.name])
            await self._spawn(p, fresh, eager, holding=True)
        except DiskFull as exc:  # the disk's fault, not the server's: no crash counted
            self._d.loads.leave(self.name)
            self._wait_for_room(exc)
        except OrchError as exc:  # config broken meanwhile, port taken, ...
            self._d.loads.leave(self.name)  # (a prepare that failed held it too)
            self._d.store.add_event(self.name, "start_failed", str(exc))
            self._decide(self._row(), Ending())

    def _not_yet(self, exc: NotYet) -> None:
        """A start that cannot happen now (`NotYet`): `backoff`, saying why,
        and tried again every `retry_s` with its restart count unchanged;
        the event is written when the reason changes."""
        at = self._fx.now() + exc.retry_s
        said, self._waiting = self._waiting == exc.message, exc.message
        self._set(
            self._row(),
            S.BACKOFF,
            exc.message,
            None if said else {"waiting": exc.message, "restart_at": at},
            desired=Desired.RUNNING,
            next_restart_at=at,
        )
        self._schedule(at)

    def _wait_for_room(self, exc: DiskFull) -> None:
        """A start the full disk refused: tried again every DISK_RETRY_S (its
        restart count unchanged) until the disk has room; said once."""
        at = self._fx.now() + DISK_RETRY_S
        said, self._room_wait = self._room_wait, True
        self._set(
            self._row(),
            S.BACKOFF,
            f"{exc.message} It starts once the disk has room.",
            None if said else {"disk_full": True, "restart_at": at},
            next_restart_at=at,
        )
        self._schedule(at)

    def _probed(self, c: Probed) -> None:
        cfg, watch = self._cfg, self._watch
        if c.ref != self._ref or cfg is None or watch is None:
            return  # an old process's probe
        row = self._row()
        if row.pid != c.ref.pid or row.state not in RUNNING_STATES or row.state == S.STOPPING:
            return
        s = step(
            row.state,
            row.desired,
            row.started_at,
            watch,
            c.result,
            cfg.healthcheck,
            cfg.restart_policy.effective_mode,
            self._fx.now(),
            c.progress,
        )
        self._watch = s.watch
        if s.state != row.state:
            self._set(row, s.state, s.reason, {"probe": c.result.to_json()})
            if s.state != S.STARTING:  # loaded, or failing its checks: the next may load
                self._d.loads.leave(self.name)
        self._publish()
        if s.state == S.HEALTHY:
            self._stop_owed = False
        if (s.restart or (self._stop_owed and s.state == S.UNHEALTHY)) and not self._unhealthy_stop:
            self._stop_owed = False
            # the exit watch sees it go, and the policy decides what follows
            self._unhealthy_stop = True
            self._tasks.cancel("probe")  # no more checks of a process on its way out
            self._own("stop", lambda: self._stop_unhealthy(c.ref, cfg.stop_timeout))

    async def _stop_unhealthy(self, ref: ProcRef, grace: float) -> None:
        try:
            await self._fx.stop(ref, grace)
        except Exception as exc:  # e.g. no descriptor left to look at the process tree
            log.exception(f"{self.name}: stopping unhealthy process {ref.pid} failed")
            self.post(StopFailed(ref, f"{type(exc).__name__}: {exc}"))

    def _stop_failed(self, c: StopFailed) -> None:
        """The stop did not happen: the process still runs, so it is watched
        and checked again (the next failed checks try the stop anew)."""
        if c.ref != self._ref or self._cfg is None:
            return
        self._unhealthy_stop = False
        self._stop_owed = True  # the next failed check tries again
        self._d.store.add_event(
            self.name,
            "stop_failed",
            f"could not stop unhealthy process {c.ref.pid} ({c.error}); checking it again",
        )
        ref, cfg = c.ref, self._cfg
        self._own("probe", lambda: self._probe_loop(ref, cfg), again=True)

    async def _exited(self, ref: ProcRef) -> None:
        if ref != self._ref:
            return  # an old process of this instance, already dealt with
        unhealthy = self._unhealthy_stop
        self._quiet()
        self._d.loads.leave(self.name)
        self._publish()
        row = self._row()
        if row.pid != ref.pid:
            return
        row = await self._record_end(row)
        if row.state == S.EXITED:
            self._decide(row, Ending(unhealthy=True) if unhealthy else Ending.of(row.last_exit))

    async def _record_end(self, row: InstanceRow) -> InstanceRow:
        """Record the death of the process `row` names, if not yet recorded."""
        if row.state not in RUNNING_STATES:
            return row
        info = await self._fx.exit_info(row)
        new, message, changes = ended(row, info)
        return self._set(row, new, message, info, **changes)

    def _decide(self, row: InstanceRow, ending: Ending) -> None:
        """Apply the restart policy to a run that ended; schedule the restart."""
        cfg = self._cfg or self._fx.config(self.name)
        if cfg is None:
            return  # no (valid) config any more: nothing to restart it with
        now = self._fx.now()
        d = after_exit(
            cfg.restart_policy,
            RestartBook(row.restarts, row.streak, row.started_at),
            ending,
            row.desired,
            now,
            self._d.rng.uniform(-1.0, 1.0),
        )
        # the delay as decided: the event's own time is taken later, when it is written
        delay = None if d.restart_at is None else round(d.restart_at - now, 3)
        self._set(
            row,
            d.state,
            d.reason,
            {"restarts": d.book.restarts, "restart_at": d.restart_at, "delay_s": delay},
            restarts=d.book.restarts,
            streak=d.book.streak,
            next_restart_at=d.restart_at,
        )
        if d.restart_at is not None:
            self._schedule(d.restart_at)

    async def _stop(self, timeout: float | None) -> bool:
        try:
            return await self._stop_draining(timeout)
        finally:
            self._draining = False  # a later start takes requests again

    async def _stop_draining(self, timeout: float | None) -> bool:
        cfg = self._cfg or self._fx.config(self.name)
        grace = timeout if timeout is not None else (cfg.stop_timeout if cfg else 10.0)
        self._draining = True  # drain: no new requests, the ones in flight finish
        self._publish()
        await self._d.settle(self.name, grace)
        self._quiet()
        self._unqueue()
        row = self._row()
        ref = ProcRef.of(row.pid, row.create_time)
        if not self._fx.alive(ref):
            row = await self._record_end(row)
            new = S.CREATED if row.state == S.CREATED else S.STOPPED
            self._set(row, new, "stopped", desired=Desired.STOPPED)
            return False
        assert ref is not None
        row = self._set(row, S.STOPPING, f"stopping process {row.pid}", desired=Desired.STOPPED)
        graceful = await self._fx.stop(ref, grace)
        info = await self._fx.exit_info(row)
        _, _, changes = ended(row, info)
        how = "stopped" if graceful else f"killed after {grace:g}s without exiting"
        self._set(
            row,
            S.STOPPED,
            f"process {row.pid} {how}",
            {"graceful": graceful},
            exited_at=self._fx.now(),
            exit_code=changes["exit_code"],
        )
        return True

    async def _adopt(self, row: InstanceRow) -> None:
        ref = ProcRef.of(row.pid, row.create_time)
        if ref is None:
            return
        store = self._d.store
        with store.transaction():
            row.supervised = True
            store.save(row)
            store.add_event(
                row.name, "adopted", f"daemon adopted process {row.pid}", {"pid": row.pid}
            )
        self.state = row.state
        if row.state == S.STARTING:
            self._d.loads.take(self.name)  # loading when the last daemon died: it holds a slot
        if row.state == S.STOPPING or row.desired == Desired.STOPPED:
            await self._stop(None)  # a `down` was under way when the last daemon died: finish it
            return
        self._watch_process(ref, self._fx.config(self.name), False)
        self._publish()

    async def _remove(self, force: bool) -> None:
        row = self._row()
        ref = ProcRef.of(row.pid, row.create_time)
        if self._fx.alive(ref):
            if not force:
                raise running_rm_refused(self.name)
            await self._stop(None)
        self._quiet()
        self._unqueue()
        self._cfg = None
        self._publish()
        await self._fx.forget(self.name)
        self.state = S.CREATED
