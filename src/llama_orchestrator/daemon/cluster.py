"""A cluster home's effects: the instance runners of the head's daemon act on
servers that run on the cluster's nodes (`cluster` in llama-orch.json).

Supervision is the one of a single box, unchanged: the same runners, health
step, deep probe, backoff and crash-loop rule, events and state, because only
the effects differ. A spawn places the instance (`cluster.placement`, on
Ray's ledger) and has its actor (`cluster.host`) start the server there; a
stop, the exit watch and the exit's facts go through that actor; the probes
go straight to the server on its node, so the router stops choosing a
replica within its own health window, whatever Ray knows yet.

A node is *lost* when no actor on it has answered for `cluster.node_timeout`
seconds (or Ray says it is dead). A lost node's servers fail their probes at
once; their runners stop them (the actor is let go, and Ray's ledger frees
what it held) and the restart policy starts them again: an unpinned instance
on another node with room, a pinned one once its node is back (`NotYet`,
no crash counted). The node's old server, if it still runs when the link
comes back, stops itself (the actor's fence): never two of one instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_orchestrator.cluster.placement import Need, Node, Placement, need_of, place
from llama_orchestrator.cluster.rayclient import Cluster
from llama_orchestrator.config.command import build_launch
from llama_orchestrator.config.fit import GPU_BACKENDS
from llama_orchestrator.config.prepare import Prepared
from llama_orchestrator.config.settings import ClusterSettings
from llama_orchestrator.daemon.effects import EventHook, LiveEffects
from llama_orchestrator.engine import health, logs
from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.engine.logs import LoadProgress
from llama_orchestrator.engine.process import ProcRef
from llama_orchestrator.engine.results import UpResult, ended, started
from llama_orchestrator.errors import NotYet, OrchError, StartFailed
from llama_orchestrator.files import private_dir
from llama_orchestrator.gpus.discover import GpuInfo
from llama_orchestrator.home import Home
from llama_orchestrator.models.catalog import model_file
from llama_orchestrator.models.gguf import MIB, estimate, read_model
from llama_orchestrator.states import RUNNING_STATES, Desired
from llama_orchestrator.store.rows import InstanceRow
from llama_orchestrator.wire.pool import Pool

__all__ = ["ClusterEffects", "ClusterScripts", "Running"]

log = logging.getLogger("llama_orchestrator.daemon")

#: how often every llama-orch node is checked for whether it answers
PING_INTERVAL = 1.0
#: how often a node's server logs are copied into the home (also at each
#: exit, and when `logs` asks); a log that had nothing new is looked at half
#: as often each time, up to LOG_COPY_MAX, and at once again when it grows
LOG_COPY_INTERVAL = 5.0
LOG_COPY_MAX = 40.0
#: how often Ray's list of nodes is read again (a node's reachability is
#: looked at every PING_INTERVAL; Ray itself calls a node dead after a minute)
NODES_INTERVAL = 5.0


@dataclass
class Running:
    """A server of ours on a node, as this daemon knows it."""

    actor: Any
    node: str
    ip: str
    need: Need
    devices: tuple[int, ...] = ()  # the cards it holds
    port: int = 0  # where it listens on its node
    ref: ProcRef | None = None
    exit: dict[str, Any] | None = None  # how it ended, once it has
    live: bool = False  # its exit watch has not returned
    released: bool = False  # its actor was let go: a start makes a new one
    #: set when its node is lost: its exit watch ends (the server counts as gone)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    #: how far the home's copy of each of its node's logs goes (None: not yet started)
    offsets: dict[str, int] | None = None
    copy_every: float = LOG_COPY_INTERVAL  # seconds between looks at its logs now
    copy_at: float = 0.0  # when they are looked at next


@dataclass
class _NodeSeen:
    last_ok: float
    lost: bool = False
    since: float = field(default_factory=time.time)
    misses: int = 0  # looks in a row that found it not answering


class ClusterEffects(LiveEffects):
    def __init__(
        self,
        home: Home,
        pool: Pool,
        settings: ClusterSettings,
        *,
        clock: Callable[[], float] = time.time,
        on_event: EventHook | None = None,
    ) -> None:
        super().__init__(home, pool, clock=clock, on_event=on_event)
        self.settings = settings
        self.cluster = Cluster(settings, home.root)
        self.running: dict[str, Running] = {}
        self.seen: dict[str, _NodeSeen] = {}
        self._placing = asyncio.Lock()  # one placement at a time: the ledger stays true
        self._pinger: asyncio.Task[None] | None = None
        self._listed = float("-inf")  # when Ray's nodes were last read
        #: the cluster's nodes as last looked at (each second)
        self.nodes_now: list[Node] = []
        #: where the plans' script tasks run (the plan runner takes it)
        self.scripts = ClusterScripts(self)

    # --- the daemon's start and end ---------------------------------------------------

    async def connect(self) -> None:
        """Join the cluster and take over the servers a daemon before us started."""
        await asyncio.to_thread(self.cluster.connect)
        self.nodes_now = await asyncio.to_thread(self.cluster.nodes)
        rows = {r.name: r for r in await self.in_thread(lambda e: e.store.all())}
        for name in await asyncio.to_thread(self.cluster.ours):
            actor = await asyncio.to_thread(self.cluster.actor, name)
            if actor is None:
                continue
            row = rows.get(name)
            try:
                pong = await asyncio.wait_for(_call(actor.ping), self.settings.call_timeout)
            except Exception:
                pong = None
            if row is None or row.node is None or pong is None or pong["pid"] != row.pid:
                # no record of it (a daemon that died between the start and the
                # record), or the record is of another run: it must not serve
                await self._kill(actor)
                continue
            cfg = self.config(name)
            need = self._need_of_config(name, cfg) if cfg else Need(None, (), 0, 0)
            self.running[name] = Running(
                actor,
                row.node,
                pong["ip"],
                need,
                tuple(row.gpu_devices or ()),
                row.port or 0,
                ProcRef.of(row.pid, row.create_time),
                live=bool(pong["alive"]),
                # its logs are copied on from here (what it wrote meanwhile is on its node)
                offsets=dict(pong["sizes"]),
            )
            self.seen.setdefault(row.node, _NodeSeen(self.now()))
        self._pinger = asyncio.create_task(self._ping_loop(), name="cluster-nodes")

    async def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
        await asyncio.to_thread(self.cluster.close)

    # --- what the runners and the router see -----------------------------------------

    def address(self, name: str, cfg: Any) -> tuple[str, int, str | None]:
        r = self.running.get(name)
        if r is None:
            return super().address(name, cfg)
        return r.ip, cfg.server.port, r.node

    def lost(self) -> set[str]:
        return {n for n, s in self.seen.items() if s.lost}

    def alive(self, ref: ProcRef | None) -> bool:
        return ref is not None and any(r.ref == ref and r.live for r in self.running.values())

    async def rows(self) -> list[InstanceRow]:
        """The rows, with the end of a server recorded whose actor is gone."""

        def observe(e: Engine) -> list[InstanceRow]:
            with e.store.transaction():
                out = []
                for name in e.known_names():
                    row = e.store.get_or_new(name)
                    r = self.running.get(name)
                    if (
                        row.state in RUNNING_STATES
                        and row.pid is not None
                        and (r is None or r.ref is None or r.ref.pid != row.pid)
                    ):
                        info = self._lost_exit(row.node)
                        new, message, changes = ended(row, info)
                        row = e.store.set_state(row, new, message, info, **changes)
                    out.append(row)
                return out

        return await self.in_thread(observe)

    async def orphans(self) -> list[tuple[str, ProcRef, list[str]]]:
        return []  # `connect` let go every actor no row owns

    async def check_gpus(self) -> None:
        return None  # the cards are the nodes'; Ray's ledger keeps their memory

    async def gpus(self) -> list[GpuInfo]:
        return []

    async def load_progress(self, name: str, ref: ProcRef) -> LoadProgress:
        return LoadProgress()

    # --- before a start ---------------------------------------------------------------

    async def prepare(self, names: list[str], strict: bool = False) -> list[Prepared]:
        from llama_orchestrator.cluster.placement import check_pin

        prepared = await self.in_thread(lambda e: e.prepare(names, strict, cluster=True))
        nodes = await asyncio.to_thread(self.cluster.nodes)
        for p in prepared:
            check_pin(p.name, self._need(p), nodes)
        return prepared

    def _need(self, p: Prepared) -> Need:
        return self._need_of_config(p.name, p.config, p.config_path.parent)

    def _need_of_config(self, name: str, cfg: Any, folder: Path | None = None) -> Need:
        folder = folder or self.home.instance_dir(name)
        g = cfg.gpu
        mib = 0
        if g.backend in GPU_BACKENDS:
            if g.vram_mib is not None:
                mib = g.vram_mib
            else:
                count = max(1, len(g.devices))
                try:
                    info = read_model(model_file(cfg.model.path, folder))
                    est = estimate(info, cfg.model.context_size, cfg.server.parallel, g.layers)
                    per = est.per_device(list(range(count)), g.tensor_split)
                    mib = -(-max(per.values()) // MIB)
                except Exception:
                    mib = 1
        return need_of(cfg, mib)

    # --- start, stop, watch --------------------------------------------------------------

    async def spawn(self, p: Prepared, fresh: bool) -> UpResult:
        async with self._placing:
            return await self._spawn(p, fresh)

    async def _spawn(self, p: Prepared, fresh: bool) -> UpResult:
        name, s = p.name, p.config.server
        need = self._need(p)
        r = self.running.get(name)
        if r is not None and r.live and r.ref is not None:
            return UpResult(name, "already running", r.ref.pid, s.port, host=r.ip)
        if r is not None and (r.released or r.need != need or r.node in self.lost()):
            await self._let_go(name)  # let go already, placed for another config, or on a lost node
            r = None
        if r is None:
            nodes = await asyncio.to_thread(self.cluster.nodes)
            per_node: dict[str, int] = {}
            ports: dict[str, set[int]] = {}
            for other_name, other in self.running.items():
                if other_name != name and not other.released:
                    per_node[other.node] = per_node.get(other.node, 0) + 1
                    ports.setdefault(other.node, set()).add(other.port)
            where = place(name, need, nodes, self.lost(), per_node, s.port, ports)
            old = await asyncio.to_thread(self.cluster.actor, name)
            if old is not None:  # an actor we no longer know of (its node came back)
                await self._kill(old)
            actor = await asyncio.to_thread(self.cluster.create, name, where)
            r = Running(actor, where.node.name, where.node.ip, need, where.devices, s.port)
        cfg = p.config.model_copy(deep=True)
        cfg.server.host = r.ip
        if need.count:
            cfg.gpu.device_id = list(r.devices)
        launch = build_launch(
            cfg,
            name,
            Path(p.launch.argv[0]),
            model_file(cfg.model.path, p.config_path.parent),
            {},
        )
        try:
            info = await asyncio.wait_for(
                _call(r.actor.start, launch.argv, launch.added_env), self.settings.call_timeout
            )
        except Exception as exc:
            await self._kill(r.actor)
            self.running.pop(name, None)
            raise StartFailed(
                f"Instance '{name}' could not be started on node {r.node}: {_reason(exc)}."
            ) from None
        r.ref, r.exit, r.live = ProcRef(info["pid"], info["create_time"]), None, True
        r.port = s.port
        if r.offsets is None:  # a new actor: its node's logs of older runs are not copied
            r.offsets = dict(info["sizes"])
        self.running[name] = r
        self.seen.setdefault(r.node, _NodeSeen(self.now())).last_ok = self.now()

        def record(e: Engine) -> None:
            with e.store.transaction():
                row = e.store.get_or_new(name)
                state, message, data, changes = started(
                    info["pid"],
                    info["create_time"],
                    r.ip,
                    s.port,
                    info["started_at"] or self.now(),
                    supervised=True,
                    devices=cfg.gpu.devices or None,
                    digest=p.config.digest(),
                    fresh=fresh,
                )
                message = f"{message} of node {r.node}"
                e.store.set_state(
                    row, state, message, {**data, "node": r.node}, node=r.node, **changes
                )

        await self.in_thread(record)
        return UpResult(name, "started", info["pid"], s.port, host=r.ip)

    async def stop(self, ref: ProcRef, grace: float) -> bool:
        name = self._name_of(ref)
        if name is None:
            return True
        r = self.running[name]
        graceful = False
        if r.node not in self.lost():
            try:
                graceful = await asyncio.wait_for(
                    _call(r.actor.stop, grace), grace + self.settings.call_timeout
                )
                r.exit = await asyncio.wait_for(
                    _call(r.actor.exit_info), self.settings.call_timeout
                )
            except Exception as exc:
                log.warning(f"{name}: stopping it on node {r.node} failed: {_reason(exc)}")
        desired = await self.in_thread(lambda e: e.store.get_or_new(name).desired)
        if desired == Desired.STOPPED or r.node in self.lost() or not graceful and r.exit is None:
            await self._let_go(name, keep_exit=True)  # its resources back to the ledger
        r.live = False
        return graceful

    async def watch_exit(self, ref: ProcRef) -> None:
        name = self._name_of(ref)
        r = self.running.get(name) if name else None
        if name is None or r is None or not r.live:
            return
        ended = asyncio.ensure_future(_call(r.actor.wait_exit, ref.pid))
        gone = asyncio.ensure_future(r.gone.wait())
        try:
            await asyncio.wait({ended, gone}, return_when=asyncio.FIRST_COMPLETED)
            if ended.done():
                r.exit = ended.result()
                await self._copy_logs(name, r)  # its last words, before its end is recorded
        except Exception:  # the actor is gone (let go, or its node died)
            pass
        finally:
            ended.cancel()
            gone.cancel()
            if r.exit is None:
                r.exit = self._lost_exit(r.node)
            if r.ref == ref:
                r.live = False

    async def exit_info(self, row: InstanceRow) -> dict[str, Any]:
        r = self.running.get(row.name)
        info = r.exit if r is not None and r.exit is not None else self._lost_exit(row.node)
        return {**info, "node": row.node}

    async def probe(self, name: str, cfg: Any, deep: bool) -> health.ProbeResult:
        r = self.running.get(name)
        if r is None or not r.live:
            return health.ProbeResult(health.DOWN, None, 0.0, "not running on any node")
        if r.node in self.lost():
            return health.ProbeResult(health.ERROR, None, 0.0, f"node {r.node} is lost")
        s = cfg.server
        if deep:
            return await health.aprobe(
                r.ip, s.port, cfg.healthcheck.timeout, self.pool.fetch, True, s.api_key
            )
        return await health.aprobe(r.ip, s.port, cfg.healthcheck.timeout, self.pool.fetch)

    async def copy_logs(self, names: list[str]) -> None:
        for name in names:
            r = self.running.get(name)
            if r is not None and not r.released and r.node not in self.lost():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._copy_logs(name, r), self.settings.call_timeout)

    async def forget(self, name: str) -> None:
        await self._let_go(name)
        await super().forget(name)

    # --- nodes ------------------------------------------------------------------------------

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(min(PING_INTERVAL, self.settings.node_timeout / 2))
            try:
                await self._ping_all()
            except Exception:  # a fault of ours must not end the watch
                log.exception("looking at the cluster's nodes failed")

    async def _ping_all(self) -> None:
        """Is each node reachable (its raylet's port answers a connection)?
        Ray itself takes a minute to call a cut-off node dead; the router
        must stop choosing its replicas within seconds. And copy the logs."""
        timeout = self.settings.node_timeout
        if self.now() - self._listed >= NODES_INTERVAL:
            self._listed = self.now()
            self.nodes_now = await asyncio.to_thread(self.cluster.nodes)
        ours = [n for n in self.nodes_now if n.ours]

        async def reach(n: Node) -> None:
            seen = self.seen.setdefault(n.name, _NodeSeen(self.now()))
            if n.alive and await _answers(n.ip, n.port, min(1.0, timeout / 2)):
                seen.last_ok, seen.misses = self.now(), 0
            else:
                seen.misses += 1
                self._listed = float("-inf")  # Ray's list read again: it may have rejoined

        async def copy(name: str, r: Running) -> None:
            grew = True  # a failed look is tried again soon
            with contextlib.suppress(Exception):
                grew = await asyncio.wait_for(self._copy_logs(name, r), timeout)
            r.copy_every = LOG_COPY_INTERVAL if grew else min(LOG_COPY_MAX, r.copy_every * 2)
            r.copy_at = self.now() + r.copy_every

        await asyncio.gather(*(reach(n) for n in ours))
        now = self.now()
        for n in ours:
            seen = self.seen.setdefault(n.name, _NodeSeen(now))
            # lost: Ray says so, or it missed two looks in a row and `timeout` passed
            lost = not n.alive or (seen.misses >= 2 and now - seen.last_ok > timeout)
            if lost != seen.lost:
                seen.lost, seen.since = lost, now
                if lost:
                    self._event(
                        None,
                        "node_lost",
                        f"node {n.name} ({n.ip}) has not answered for {now - seen.last_ok:.0f}s; "
                        "its unpinned instances start elsewhere, the pinned ones wait for it",
                    )
                    await self._lose(n.name)
                else:
                    self._event(None, "node_back", f"node {n.name} ({n.ip}) answers again")
        away = self.lost()
        due = [(n, r) for n, r in self.running.items() if r.node not in away and now >= r.copy_at]
        await asyncio.gather(*(copy(name, r) for name, r in due))

    async def _ask(self, r: Running, method: Any, *args: Any, timeout: float = 0.0) -> Any:
        """An actor's answer, given up after `timeout` + `cluster.call_timeout`
        seconds or as soon as its node is taken for lost."""
        call = asyncio.ensure_future(_call(method, *args))
        deadline = self.now() + timeout + self.settings.call_timeout
        while not call.done():
            if r.node in self.lost() or self.now() > deadline:
                call.cancel()
                raise asyncio.TimeoutError
            await asyncio.wait({call}, timeout=0.2)
        return call.result()

    async def _copy_logs(self, name: str, r: Running) -> bool:
        """Append what the node's logs of `name` gained to the home's copy
        (one call to its actor for both streams; big logs in a few);
        whether they had anything new."""
        log_dir = self.home.log_dir(name)
        grew = False
        while r.offsets is not None:
            got = await _call(r.actor.read, dict(r.offsets))
            if not any(data for _, data in got.values()):
                return grew
            grew = True

            def append(got: dict[str, tuple[int, bytes]] = got) -> None:
                private_dir(log_dir)
                for stream, (_, data) in got.items():
                    if data:
                        with open(logs.log_file(log_dir, stream), "ab") as f:
                            f.write(data)

            await asyncio.to_thread(append)
            r.offsets = {stream: offset for stream, (offset, _) in got.items()}
        return grew

    def _event(self, instance: str | None, kind: str, message: str) -> None:
        self.engine().store.add_event(instance, kind, message)

    # --- inside ------------------------------------------------------------------------------

    def _name_of(self, ref: ProcRef) -> str | None:
        return next((n for n, r in self.running.items() if r.ref == ref), None)

    async def _kill(self, actor: Any) -> None:
        """Ray's kill of an actor (a call to the head, off the event loop)."""
        await asyncio.to_thread(self.cluster.kill, actor)

    async def _lose(self, node: str) -> None:
        """A lost node's servers count as ended: their actors let go (Ray's
        ledger frees their cards; each actor's fence stops its server if the
        node comes back) and their exit watches end, so that the restart
        policy starts the unpinned ones elsewhere at once."""
        for name, r in list(self.running.items()):
            if r.node == node and not r.released:
                r.exit = self._lost_exit(node)
                await self._let_go(name, keep_exit=True)
                r.gone.set()

    async def _let_go(self, name: str, keep_exit: bool = False) -> None:
        r = self.running.get(name)
        if r is None:
            return
        await self._kill(r.actor)
        if keep_exit:  # its end is still to be read (exit_info)
            r.live, r.released = False, True
        else:
            self.running.pop(name, None)

    def _lost_exit(self, node: str | None) -> dict[str, Any]:
        """How a server ended that went with its node (or its actor)."""
        return {
            "code": None,
            "signal": None,
            "at": self.now(),
            "stderr_tail": [],
            "lost": node or "?",
        }


class ClusterScripts:
    """A cluster home's plan script tasks: each attempt runs on a node with
    the cards it asks for (`placement.place_script`), in an actor holding
    them in Ray's ledger; its output comes back to the run's folder."""

    def __init__(self, fx: ClusterEffects) -> None:
        self.fx = fx
        #: (node, card) held by a script task picked and not yet ended
        self.taken: dict[str, set[tuple[str, int]]] = {}

    def never(self, task: Any) -> str | None:
        """Why `task` can never run on this cluster (no node with that many cards)."""
        want = task.gpus if task.gpus is not None else 1
        ids = tuple(want) if isinstance(want, (list, tuple)) else None
        count = len(ids) if ids is not None else want
        for n in self.fx.nodes_now:
            if n.ours and len(n.cards) >= count and all(n.card(i) for i in ids or ()):
                return None
        return f"no node of the cluster has {'GPU ' + ','.join(map(str, ids)) if ids else f'{count} card(s)'}"

    def reserve(self, run_id: str, task: Any) -> Placement | str:
        """The node and cards for `task` now, or why it waits."""
        from llama_orchestrator.cluster.placement import place_script

        want = task.gpus if task.gpus is not None else 1
        taken = set().union(*self.taken.values()) if self.taken else set()
        try:
            where = place_script(
                task.id,
                tuple(want) if isinstance(want, (list, tuple)) else want,
                task.vram_mib,
                self.fx.nodes_now,
                self.fx.lost(),
                taken,
            )
        except NotYet as exc:
            return exc.message
        self.taken[f"{run_id}/{task.id}"] = {(where.node.name, d) for d in where.devices}
        return where

    async def run(
        self, key: str, where: Placement, argv: list[str], env: dict[str, str], cwd: str
    ) -> dict[str, Any]:
        """One attempt on its node: {code, signal, out, err} or {error}."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from llama_orchestrator.cluster.host import ScriptHost
        from llama_orchestrator.gpus.leases import lease_env

        cluster = self.fx.cluster
        actor = (
            cluster.ray.remote(ScriptHost)
            .options(
                num_cpus=0,
                resources=where.resources,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(where.node.id, soft=False),
            )
            .remote()
        )
        try:
            return await _call(actor.run, argv, {**env, **lease_env(where.devices)}, cwd)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return {"error": f"node {where.node.name} did not run it: {_reason(exc)}"}
        finally:  # cancelled, timed out or done: its command and its cards go
            await asyncio.to_thread(cluster.kill, actor)
            self.taken.pop(key, None)


async def _answers(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within `timeout`."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _call(method: Any, *args: Any) -> Any:
    """An actor method called, as an awaitable (Ray's ObjectRef)."""
    return method.remote(*args)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    if isinstance(exc, OrchError):
        return exc.message
    text = str(exc).strip().splitlines()
    cause = next((ln for ln in reversed(text) if ln.strip()), type(exc).__name__)
    return cause.strip()
