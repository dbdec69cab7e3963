"""A fake world for the daemon's instance runners: processes that are only
records, probes that answer what the test says, and a clock that moves only
when the test advances it. The state database is the real one (SQLite in
tmp_path): it is the thing whose rows the runners own."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_orchestrator.config.command import Launch
from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.config.parse import parse_config
from llama_orchestrator.config.prepare import Prepared
from llama_orchestrator.config.settings import RouterSettings
from llama_orchestrator.daemon.board import Board
from llama_orchestrator.daemon.commands import Start
from llama_orchestrator.daemon.loads import LoadGate
from llama_orchestrator.daemon.runner import RunnerDeps
from llama_orchestrator.daemon.supervisor import Supervisor
from llama_orchestrator.engine.health import DOWN, ERROR, HEALTHY, LOADING, LOCAL, ProbeResult
from llama_orchestrator.engine.logs import LoadProgress
from llama_orchestrator.engine.process import ProcRef
from llama_orchestrator.engine.results import UpResult, ended, started
from llama_orchestrator.errors import UnknownInstance
from llama_orchestrator.gpus.discover import GpuInfo
from llama_orchestrator.home import Home
from llama_orchestrator.models.gguf import ModelError, ModelInfo
from llama_orchestrator.router.slots import Slots
from llama_orchestrator.states import RUNNING_STATES
from llama_orchestrator.store.database import Store
from llama_orchestrator.store.rows import InstanceRow
from llama_orchestrator.store.unsaved import Unsaved
from tests.helpers import overlay

T0 = 1_000_000.0

_HTTP = {HEALTHY: 200, LOADING: 503, DOWN: None, ERROR: 500, LOCAL: None}


@dataclass
class FakeProc:
    ref: ProcRef
    name: str
    ignores_term: bool = False
    code: int | None = None
    signal: int | None = None
    gone: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def alive(self) -> bool:
        return not self.gone.done()

    def end(self, code: int | None = None, signal: int | None = None) -> None:
        if self.alive:
            self.code, self.signal = code, signal
            self.gone.set_result(None)


class FakeEffects:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.t = T0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self.configs: dict[str, InstanceConfig] = {}
        #: what the next probes of an instance answer (a status, or a list consumed in order)
        self.health: dict[str, Any] = {}
        self.procs: list[FakeProc] = []
        self.probes: list[tuple[float, str, bool]] = []  # (time, name, deep)
        self.stops: list[tuple[str, float]] = []  # (name, grace)
        self.spawn_fails: dict[str, Exception] = {}
        #: faults of the daemon's own (EMFILE ...): raised once each, in order
        self.stop_faults: list[Exception] = []
        self.watch_faults: list[Exception] = []
        self.ignore_term: set[str] = set()
        self.forgotten: list[str] = []
        self.rotated: list[list[str]] = []
        self.cards: Callable[[], list[GpuInfo]] = list
        self.models: dict[str, ModelInfo] = {}  # by file name
        #: bytes an instance's logs hold (a test grows it: its load progresses)
        self.logged: dict[str, int] = {}
        #: instances whose next process is gone as soon as it is spawned: its exit code
        self.dies_at_once: dict[str, int] = {}
        #: turns of the loop exit_info takes (the real one reads the log tail in a thread)
        self.exit_info_lag = 0

    # --- the test's controls -------------------------------------------------------

    def add(self, name: str, **overrides: Any) -> InstanceConfig:
        data: dict[str, Any] = {
            "model": {"path": "m.gguf"},
            "server": {"port": 9000 + len(self.configs), "parallel": 2},
            "healthcheck": {"interval": 1, "timeout": 0.5, "retries": 2, "start_period": 0},
            "restart_policy": {"backoff_initial": 1, "backoff_max": 8, "max_retries": 3},
            "stop_timeout": 5,
        }
        cfg = parse_config(json.dumps(overlay(data, overrides)), f"{name}/config.json", name)
        self.configs[name] = cfg
        return cfg

    def proc(self, name: str) -> FakeProc:
        """The newest process of `name`."""
        return [p for p in self.procs if p.name == name][-1]

    def running(self, name: str) -> list[FakeProc]:
        return [p for p in self.procs if p.name == name and p.alive]

    async def settle(self) -> None:
        """Let every task run until all wait for the clock (or for a test's move)."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance(self, seconds: float, step: float = 0.05) -> None:
        """Move the clock forward in small steps, waking the sleepers due."""
        end = self.t + seconds
        while self.t < end - 1e-9:
            self.t = min(end, self.t + step)
            due = [f for at, f in self._sleepers if at <= self.t + 1e-9]
            self._sleepers = [(at, f) for at, f in self._sleepers if at > self.t + 1e-9]
            for f in due:
                if not f.done():
                    f.set_result(None)
            await self.settle()

    # --- Effects ----------------------------------------------------------------------

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        f = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + seconds, f))
        try:
            await f
        finally:
            if not f.done():
                f.cancel()

    def config(self, name: str) -> InstanceConfig | None:
        return self.configs.get(name)

    async def prepare(self, names: list[str], strict: bool = False) -> list[Prepared]:
        out = []
        for n in names:
            if n not in self.configs:
                raise UnknownInstance(n, sorted(self.configs))
            out.append(
                Prepared(
                    n,
                    self.configs[n],
                    Path(f"{n}/config.json"),
                    Launch(["srv", n], {}),
                    devices=self.configs[n].gpu.devices,
                )
            )
        return out

    async def spawn(self, p: Prepared, fresh: bool) -> UpResult:
        if p.name in self.spawn_fails:
            raise self.spawn_fails[p.name]
        row = self.store.get_or_new(p.name)
        live = self.running(p.name)
        port = p.config.server.port
        if live:
            return UpResult(p.name, "already running", live[0].ref.pid, port)
        ref = ProcRef(4000 + len(self.procs), self.t)
        self.procs.append(FakeProc(ref, p.name, ignores_term=p.name in self.ignore_term))
        if p.name in self.dies_at_once:
            self.procs[-1].end(code=self.dies_at_once.pop(p.name))
        state, message, data, changes = started(
            ref.pid,
            ref.create_time,
            p.config.server.host,
            port,
            self.t,
            supervised=True,
            devices=p.devices,
            digest=p.config.digest(),
            fresh=fresh,
        )
        self.store.set_state(row, state, message, data, **changes)
        return UpResult(p.name, "started", ref.pid, port)

    def _find(self, ref: ProcRef | None) -> FakeProc | None:
        return next((p for p in self.procs if ref is not None and p.ref == ref), None)

    async def stop(self, ref: ProcRef, grace: float) -> bool:
        proc = self._find(ref)
        self.stops.append((proc.name if proc else "?", grace))
        if self.stop_faults:
            raise self.stop_faults.pop(0)
        if proc is None or not proc.alive:
            return True
        if proc.ignores_term:
            await self.sleep(grace)
            proc.end(signal=9)
            return False
        proc.end(signal=15)
        return True

    def address(self, name: str, cfg: InstanceConfig) -> tuple[str, int, str | None]:
        return (
            "127.0.0.1" if cfg.server.host == "0.0.0.0" else cfg.server.host,
            cfg.server.port,
            None,
        )

    async def probe(self, name: str, cfg: InstanceConfig, deep: bool) -> ProbeResult:
        name = next(n for n, c in self.configs.items() if c is cfg)
        self.probes.append((self.t, name, deep))
        answer = self.health.get(name, DOWN)
        if isinstance(answer, list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        return ProbeResult(answer, _HTTP[answer], 1.0, None if answer == HEALTHY else answer)

    async def load_progress(self, name: str, ref: ProcRef) -> LoadProgress:
        return LoadProgress(self.logged.get(name, 0))

    async def watch_exit(self, ref: ProcRef) -> None:
        if self.watch_faults:
            raise self.watch_faults.pop(0)
        proc = self._find(ref)
        if proc is not None:
            await asyncio.shield(proc.gone)

    async def exit_info(self, row: InstanceRow) -> dict[str, Any]:
        for _ in range(self.exit_info_lag):
            await asyncio.sleep(0)
        proc = self._find(ProcRef.of(row.pid, row.create_time))
        return {
            "code": proc.code if proc else None,
            "signal": proc.signal if proc else None,
            "at": self.t,
            "stderr_tail": [],
        }

    def alive(self, ref: ProcRef | None) -> bool:
        proc = self._find(ref)
        return proc is not None and proc.alive

    async def forget(self, name: str) -> None:
        self.forgotten.append(name)
        self.store.delete(name)

    async def load_configs(self) -> dict[str, InstanceConfig]:
        return dict(self.configs)

    async def load_upstreams(self) -> dict[str, tuple[Any, Path]]:
        return {}  # the upstreams' own tests run on a real daemon

    async def gpus(self) -> list[GpuInfo]:
        return self.cards()

    async def model(self, path: Path) -> ModelInfo:
        if path.name not in self.models:
            raise ModelError(f"{path} is not a model the test made")
        return self.models[path.name]

    async def copy_logs(self, names: list[str]) -> None:
        return None

    async def mark_used(self, used: dict[str, float]) -> None:
        await asyncio.sleep(0)  # the real one writes in a thread: the loop turns meanwhile
        self.store.mark_used(used)

    async def rows(self) -> list[InstanceRow]:
        for row in self.store.all():
            ref = ProcRef.of(row.pid, row.create_time)
            if row.state in RUNNING_STATES and not self.alive(ref):
                new, message, changes = ended(row, await self.exit_info(row))
                self.store.set_state(row, new, message, **changes)
        return self.store.all()

    async def orphans(self) -> list[tuple[str, ProcRef, list[str]]]:
        return []

    async def record_found(self, name: str, ref: ProcRef, host: str, port: int) -> None:
        raise AssertionError("the fake world has no orphans")

    async def rotate_logs(self, names: list[str]) -> None:
        self.rotated.append(sorted(names))

    async def check_gpus(self) -> None:
        pass

    async def write_state(self) -> None:
        self.store.flush()


class World:
    """A supervisor and its runners on a FakeEffects, with the real store."""

    def __init__(self, home: Home) -> None:
        self.unsaved = Unsaved()  # as the daemon's stores: a full disk does not stop it
        self.store = Store.open(home.db_path, clock=lambda: self.fx.t, unsaved=self.unsaved)
        self.fx = FakeEffects(self.store)
        self.board = Board()
        self.board_log: list[set[str]] = []  # who took requests after each change
        self.board.watch(lambda: self.board_log.append(set(self.board.replicas)))
        self.settled: list[tuple[str, float]] = []
        self.slots = Slots(RouterSettings(), lambda: self.board.replicas.values(), self.fx.now)
        self.board.watch(self.slots.wake)

        async def settle(name: str, timeout: float) -> None:
            self.settled.append((name, timeout))
            await self.slots.settle(name, timeout)

        # no load limit: the load queue's own tests set one (w.deps.loads.set_limit)
        self.deps = RunnerDeps(
            self.store, self.fx, self.board, settle, rng=random.Random(1), loads=LoadGate(0)
        )
        self.sup = Supervisor(home, self.deps)

    def row(self, name: str):
        r = self.store.get(name)
        assert r is not None
        return r

    def kinds(self, name: str) -> list[str]:
        return [e.kind for e in self.store.events(name)]

    async def up(self, name: str, **kw):
        (p,) = await self.fx.prepare([name])
        return await self.sup.runner(name).ask(Start(p, **kw))
