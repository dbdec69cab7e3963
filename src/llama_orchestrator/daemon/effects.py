"""What the daemon does to the world, behind one seam (llama-swap's `Effects`).

The instance runners and the supervisor act only through an `Effects`:
spawning and stopping processes, probing them, learning of their end,
reading configs, the clock and sleeping. `LiveEffects` does it for real;
the unit tests hand the runners a fake one with a fake clock, so every
decision of the daemon is tested without a process or a socket.

Blocking work (spawning, stopping, reading a dead process's exit) runs in
worker threads, each with an engine (and SQLite connection) of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from llama_orchestrator import platform
from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.config.parse import load_config
from llama_orchestrator.config.prepare import Prepared
from llama_orchestrator.config.upstream import UpstreamConfig
from llama_orchestrator.config.validate import load_all
from llama_orchestrator.engine import health
from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.engine.logs import LoadProgress, load_progress
from llama_orchestrator.engine.process import ProcRef, activity, find, stop_tree, wait_exit
from llama_orchestrator.engine.results import UpResult
from llama_orchestrator.errors import OrchError
from llama_orchestrator.gpus.discover import Discovery, GpuInfo, VulkanCache, discover
from llama_orchestrator.home import Home
from llama_orchestrator.models.gguf import ModelInfo, read_model
from llama_orchestrator.store.rows import InstanceRow
from llama_orchestrator.store.unsaved import Unsaved
from llama_orchestrator.wire.pool import Pool

__all__ = ["Effects", "LiveEffects", "EventHook", "changed_within"]

T = TypeVar("T")

#: hook(instance, kind, message, data) after every event recorded (daemon.log, metrics)
EventHook = Callable[[Any, str, str, dict[str, Any]], None]


class Effects(Protocol):
    """Everything an instance runner needs from outside itself."""

    def now(self) -> float:
        """The wall clock (recorded times, ages, backoff deadlines)."""

    async def sleep(self, seconds: float) -> None: ...

    def config(self, name: str) -> InstanceConfig | None:
        """The instance's config as it is on disk now; None if missing or invalid."""

    async def load_configs(self) -> dict[str, InstanceConfig]:
        """Every valid config of the home (the invalid ones are left out)."""

    async def prepare(self, names: list[str], strict: bool = False) -> list[Prepared]:
        """Validate the named instances and build their launches (raises OrchError)."""

    async def spawn(self, p: Prepared, fresh: bool) -> UpResult:
        """Start `p` unless a process of it already runs, and record it as
        `starting`, in one transaction (no other process can start it too)."""

    async def stop(self, ref: ProcRef, grace: float) -> bool:
        """Stop the process tree (graceful, then killed after `grace`); True
        when the graceful stop was enough. Returns once none of it lives."""

    async def probe(self, name: str, cfg: InstanceConfig, deep: bool) -> health.ProbeResult:
        """One health check of instance `name` (`deep`: the 1-token completion)."""

    def address(self, name: str, cfg: InstanceConfig) -> tuple[str, int, str | None]:
        """Where the router reaches the server of `name`: host, port, and the
        cluster node it runs on (None: this machine)."""

    async def load_progress(self, name: str, ref: ProcRef) -> LoadProgress:
        """How the model load of process `ref` goes, from its logs and the process."""

    async def watch_exit(self, ref: ProcRef) -> None:
        """Return once the process has ended (at once if it already has)."""

    async def exit_info(self, row: InstanceRow) -> dict[str, Any]:
        """How the dead process of `row` ended (see `Engine.exit_info`)."""

    def alive(self, ref: ProcRef | None) -> bool: ...

    async def forget(self, name: str) -> None:
        """Delete the instance's state, config folder and logs."""

    async def rows(self) -> list[InstanceRow]:
        """Every instance's row, the deaths of processes gone since recorded."""

    async def orphans(self) -> list[tuple[str, ProcRef, list[str]]]:
        """Live processes marked as this home's instances that no row owns."""

    async def record_found(self, name: str, ref: ProcRef, host: str, port: int) -> None:
        """Record an orphan as the instance's running process (to be adopted)."""

    async def rotate_logs(self, names: list[str]) -> None:
        """Rotate the logs of these (running) instances that are over their size."""

    async def check_gpus(self) -> None:
        """Record alerts about the cards instances are pinned to (hot, missing)."""

    async def write_state(self) -> None:
        """Write what a full disk refused before, if there is room now."""

    async def gpus(self) -> list[GpuInfo]:
        """The GPUs now, with their free memory."""

    async def load_upstreams(self) -> dict[str, tuple[UpstreamConfig, Path]]:
        """The external upstreams' configs (those that parse), with their folders."""

    async def model(self, path: Path) -> ModelInfo:
        """A model file's metadata (raises ModelError or OSError)."""

    async def mark_used(self, used: dict[str, float]) -> None:
        """Record when on-demand instances last served a request."""

    async def copy_logs(self, names: list[str]) -> None:
        """Bring the named instances' logs up to date in the home (a cluster
        node's are copied; this machine's are there already)."""


async def changed_within(fx: Effects, event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set, at most `seconds` of the effects' clock;
    whether it was."""
    if event.is_set():
        return True
    timer = asyncio.ensure_future(fx.sleep(seconds))
    waiting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({timer, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        waiting.cancel()
    return event.is_set()


class LiveEffects:
    """The real processes, sockets, files and clock."""

    def __init__(
        self,
        home: Home,
        pool: Pool,
        *,
        clock: Callable[[], float] = time.time,
        on_event: EventHook | None = None,
    ) -> None:
        self.home = home
        self.pool = pool  # the daemon's HTTP client: the probes go through it
        self.clock = clock
        self.on_event = on_event
        self._local = threading.local()
        #: what a full disk refused, shared by the connections of every thread
        self.unsaved = Unsaved()
        self._gpus_checked = float("-inf")
        self._vulkan = VulkanCache()  # sampled every few seconds: one vulkaninfo per 30 s

    def engine(self) -> Engine:
        """An engine for the calling thread (SQLite connections are per thread)."""
        eng = getattr(self._local, "engine", None)
        if eng is None:
            eng = self._local.engine = Engine(
                self.home,
                clock=self.clock,
                supervisor=True,
                unsaved=self.unsaved,
                find_gpus=self.discover,
            )
            eng.store.on_event = self.on_event
        return eng

    async def copy_logs(self, names: list[str]) -> None:
        return None  # this machine's servers write into the home themselves

    async def connect(self) -> None:
        """Join what runs the servers, when it is not this machine (`ClusterEffects`)."""

    async def close(self) -> None:
        """Leave it again."""

    def now(self) -> float:
        return self.clock()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def config(self, name: str) -> InstanceConfig | None:
        try:
            return load_config(self.home.config_path(name))
        except OrchError:
            return None

    async def load_configs(self) -> dict[str, InstanceConfig]:
        loaded = await asyncio.to_thread(load_all, self.home)
        return {x.name: x.config for x in loaded if x.config is not None}

    async def load_upstreams(self) -> dict[str, tuple[UpstreamConfig, Path]]:
        """The external upstreams' configs (those that parse), with their folders."""

        def read() -> dict[str, tuple[UpstreamConfig, Path]]:
            return {x.name: (x.upstream, x.path.parent) for x in load_all(self.home) if x.upstream}

        return await asyncio.to_thread(read)

    async def in_thread(self, fn: Callable[[Engine], T]) -> T:
        """fn(engine) in a worker thread with that thread's own engine."""
        return await asyncio.to_thread(lambda: fn(self.engine()))

    async def rows(self) -> list[InstanceRow]:
        return await self.in_thread(lambda e: e.rows())

    async def orphans(self) -> list[tuple[str, ProcRef, list[str]]]:
        return await self.in_thread(lambda e: e.orphans())

    async def record_found(self, name: str, ref: ProcRef, host: str, port: int) -> None:
        await self.in_thread(lambda e: e.record_found(name, ref, host, port))

    async def rotate_logs(self, names: list[str]) -> None:
        def rotate(e: Engine) -> None:
            for name in names:
                e.rotate_logs(name, e.store.get_or_new(name).started_at)

        await self.in_thread(rotate)

    async def check_gpus(self) -> None:
        """At most every `gpu.sample_interval` (discovery runs nvidia-smi or NVML)."""
        from llama_orchestrator.engine import views

        now = time.monotonic()
        interval = (await self.in_thread(lambda e: e.settings)).gpu.sample_interval
        if now - self._gpus_checked >= interval:
            self._gpus_checked = now
            await self.in_thread(views.pinned_gpu_warnings)

    async def write_state(self) -> None:
        if self.unsaved:
            await self.in_thread(lambda e: e.store.flush())

    async def prepare(self, names: list[str], strict: bool = False) -> list[Prepared]:
        return await self.in_thread(lambda e: e.prepare(names, strict))

    async def spawn(self, p: Prepared, fresh: bool) -> UpResult:
        return await self.in_thread(lambda e: e.spawn(p, fresh=fresh))

    async def stop(self, ref: ProcRef, grace: float) -> bool:
        return await asyncio.to_thread(stop_tree, ref, grace)

    def address(self, name: str, cfg: InstanceConfig) -> tuple[str, int, str | None]:
        return health.probe_host(cfg.server.host), cfg.server.port, None

    async def probe(self, name: str, cfg: InstanceConfig, deep: bool) -> health.ProbeResult:
        s = cfg.server
        if deep:
            return await health.aprobe(
                s.host, s.port, cfg.healthcheck.timeout, self.pool.fetch, True, s.api_key
            )
        return await health.aprobe(s.host, s.port, cfg.healthcheck.timeout, self.pool.fetch)

    async def load_progress(self, name: str, ref: ProcRef) -> LoadProgress:
        log_dir = self.home.log_dir(name)
        return await asyncio.to_thread(lambda: load_progress(log_dir, activity(ref)))

    async def watch_exit(self, ref: ProcRef) -> None:
        """On Linux a pidfd registered with the event loop (any process, also
        one adopted from an earlier daemon); elsewhere a thread blocked in
        wait(), a daemon thread, so a process that outlives us never holds
        the daemon's exit."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def seen() -> None:
            if not done.done():
                done.set_result(None)

        fd = platform.exit_fd(ref.pid)
        if fd is None:

            def wait() -> None:
                wait_exit(ref)
                with contextlib.suppress(RuntimeError):  # the loop closed: we are exiting
                    loop.call_soon_threadsafe(seen)

            threading.Thread(target=wait, daemon=True, name=f"wait-{ref.pid}").start()
        else:
            loop.add_reader(fd, seen)
        try:
            if find(ref) is None:  # ended before the watch began (or the pid is reused)
                return
            await done
        finally:
            if fd is not None:
                loop.remove_reader(fd)
                os.close(fd)

    async def exit_info(self, row: InstanceRow) -> dict[str, Any]:
        # reaping a process whose threads are still exiting may take a moment
        return await self.in_thread(lambda e: e.exit_info(row))

    def alive(self, ref: ProcRef | None) -> bool:
        return find(ref) is not None

    async def forget(self, name: str) -> None:
        await self.in_thread(lambda e: e.forget(name))

    def discover(self) -> Discovery:
        return discover(self._vulkan)

    async def gpus(self) -> list[GpuInfo]:
        return (await asyncio.to_thread(self.discover)).gpus

    async def model(self, path: Path) -> ModelInfo:
        """The model's header (read once per version of the file: on-demand
        plans ask on every start)."""
        return await asyncio.to_thread(read_model, path)

    async def mark_used(self, used: dict[str, float]) -> None:
        await self.in_thread(lambda e: e.store.mark_used(used))
