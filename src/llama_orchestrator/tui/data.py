"""What the dashboard shows, and where it comes from.

`parse_metrics`, `per_second`, `matches` and `Snapshot` are pure. `EngineSource`
gathers a snapshot with the same core functions the CLI uses (status,
views, logs); it runs in a worker thread, never in the UI's event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil

from llama_orchestrator.daemon import Control, control
from llama_orchestrator.daemon.info import DaemonInfo, running
from llama_orchestrator.engine import health, views
from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.engine.logs import STREAMS, log_file
from llama_orchestrator.engine.status import (
    Description,
    InstanceStatus,
    collect,
    iso,
    with_loads,
    with_upstreams,
)
from llama_orchestrator.gpus.alerts import GpuStatus
from llama_orchestrator.home import Home
from llama_orchestrator.plans.records import RunFiles, list_runs
from llama_orchestrator.present import plan_cancelled, plan_requeued

__all__ = [
    "InstanceView",
    "Snapshot",
    "DataSource",
    "EngineSource",
    "header",
    "parse_metrics",
    "per_second",
    "matches",
]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {name: value} (labels dropped; llama-server uses none)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 2:
            try:
                out[parts[0].split("{", 1)[0]] = float(parts[1])
            except ValueError:
                continue
    return out


def per_second(prev: tuple[float, float] | None, now: tuple[float, float]) -> float | None:
    """Rate between two (time, counter) samples; None without a usable previous one."""
    if prev is None or now[0] <= prev[0] or now[1] < prev[1]:  # a restart resets counters
        return None
    return (now[1] - prev[1]) / (now[0] - prev[0])


@dataclass
class InstanceView:
    """One table row: `ps --json` keys plus live process and server figures."""

    status: InstanceStatus
    cpu_pct: float | None = None
    rss_mib: float | None = None
    active: int | None = None  # requests being processed + deferred
    tokens_per_s: float | None = None
    #: the peer it runs on (its own `ps` row, `fleet`); None: this machine
    machine: str | None = None

    @property
    def name(self) -> str:
        return str(self.status["name"])

    @property
    def key(self) -> str:
        """What names the row: the instance, `name@peer` for a peer's."""
        return self.name if self.machine is None else f"{self.name}@{self.machine}"


def matches(view: InstanceView, query: str) -> bool:
    """The `/` filter: a case-insensitive substring of name, alias or state."""
    q = query.strip().lower()
    if not q:
        return True
    s = view.status
    fields = [s.get(k) for k in ("name", "alias", "state")] + [view.machine]
    return any(q in str(f or "").lower() for f in fields)


@dataclass
class Snapshot:
    mode: str  # what the header says about where the data comes from
    instances: list[InstanceView] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    gpus: GpuStatus | None = None
    #: the newest plan runs (RunView.to_json(), tasks included), newest first
    plans: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    #: peer name -> why its instances are not shown
    unreached: dict[str, str] = field(default_factory=dict)


class DataSource(Protocol):
    home: Home

    def snapshot(self, with_gpus: bool) -> Snapshot: ...
    def up(self, name: str) -> None: ...
    def down(self, name: str) -> None: ...
    def restart(self, name: str) -> None: ...
    def describe(self, name: str) -> Description: ...
    def log_paths(self, name: str) -> dict[str, Path]: ...
    def task_output(self, run_id: str, task_id: str) -> tuple[str | None, str | None]: ...
    def cancel_plan(self, run_id: str) -> str: ...
    def retry_plan(self, run_id: str) -> str: ...


T = TypeVar("T")

#: plan runs the dashboard lists
PLAN_RUNS_SHOWN = 30
#: seconds between asks of the peers' routers for their instances
PEERS_EVERY = 2.0


def header(info: DaemonInfo | None) -> str:
    """What the status line says about who supervises and where the router is (pure)."""
    if info is None:
        return "no daemon: reading state and probing directly (`llama-orch up` starts one)"
    text = f"daemon pid {info.pid}"  # short: the router's address must fit 80 columns
    if info.router_url:
        return f"{text}; router {info.router_url}/v1"
    if info.router_error:
        return f"{text}; no router: {info.router_error}"
    return text


class EngineSource:
    """Reads the store (what the daemon records) and probes the instances no
    daemon supervises, as `ps` does. Actions use a fresh Engine each, so a
    restart waiting for health never blocks the next snapshot's database reads."""

    def __init__(
        self,
        home: Home,
        get: health.Getter = health.http_get,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.home = home
        self._engine = Engine(home)
        self._get = get
        self._clock = clock
        self._lock = threading.Lock()  # one snapshot at a time on this engine's connection
        self._procs: dict[int, psutil.Process] = {}
        self._counters: dict[str, tuple[float, float]] = {}
        self._peers: list[InstanceView] = []
        self._unreached: dict[str, str] = {}
        self._peers_at: float | None = None

    def snapshot(self, with_gpus: bool = False) -> Snapshot:
        with self._lock:
            engine = self._engine
            rows = collect(engine)
            activity = control(engine, start=False).activity()
            with_loads(rows, activity.loads)
            with_upstreams(rows, activity.upstreams)
            views_ = [self._live(r) for r in rows]
            events = [
                {**e.to_json(), "id": e.id, "ts": iso(e.ts)} for e in engine.store.events(limit=200)
            ]
            busy = activity.in_flight
            gpus = views.gpu_sample(engine, lambda n: busy.get(n, 0) > 0) if with_gpus else None
            plans = [v.to_json() for v in list_runs(engine.store, PLAN_RUNS_SHOWN)]
        self._ask_peers()
        return Snapshot(
            header(running(self.home)),
            views_ + self._peers,
            events,
            gpus,
            plans,
            unreached=dict(self._unreached),
        )

    def _ask_peers(self) -> None:
        """The peers' rows (`fleet`), asked again every PEERS_EVERY seconds."""
        now = time.monotonic()  # pacing only (the injected clock times the token rates)
        if self._peers_at is not None and now - self._peers_at < PEERS_EVERY:
            return
        self._peers_at = now
        from llama_orchestrator.errors import OrchError
        from llama_orchestrator.hosts import fleet

        try:
            seen = fleet.look(self.home, [])
        except OrchError:  # a broken llama-orch.json: `ps` and the daemon say so
            seen = fleet.Fleet()
        self._peers = [
            InstanceView(row, machine=row["machine"])  # type: ignore[arg-type]
            for row in seen.rows
        ]
        self._unreached = seen.unreached

    def _usage(self, view: InstanceView, pid: int) -> None:
        """CPU and memory of this machine's process `pid`."""
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first call only starts the measurement
            else:
                view.cpu_pct = proc.cpu_percent(None)
            view.rss_mib = proc.memory_info().rss / (1024 * 1024)
        except psutil.Error:
            self._procs.pop(pid, None)

    def _live(self, status: InstanceStatus) -> InstanceView:
        view = InstanceView(status)
        pid = status.get("pid")
        if not pid:
            return view
        if not status.get("node"):  # a cluster node's pid is not one of this machine's
            self._usage(view, pid)
        port = status["port"]
        if status["state"] == "healthy" and port:
            try:
                code, body = self._get(
                    health.probe_host(status["host"] or "127.0.0.1"), port, "/metrics", 1.0
                )
            except OSError:
                return view
            if code == 200:
                m = parse_metrics(body)
                view.active = int(
                    m.get("llamacpp:requests_processing", 0)
                    + m.get("llamacpp:requests_deferred", 0)
                )
                sample = (self._clock(), m.get("llamacpp:tokens_predicted_total", 0.0))
                view.tokens_per_s = per_second(self._counters.get(view.name), sample)
                self._counters[view.name] = sample
        return view

    def _act(self, fn: Callable[[Control], T], start_daemon: bool = True) -> T:
        """As the CLI does: through the daemon (started for up/restart and the
        plan verbs, as `llama-orch up` starts it), on a fresh engine per action."""
        engine = Engine(self.home)
        try:
            return fn(control(engine, start=start_daemon))
        finally:
            engine.close()

    def up(self, name: str) -> None:
        self._act(lambda c: c.up([name], wait=False))

    def down(self, name: str) -> None:
        self._act(lambda c: c.down([name]), start_daemon=False)

    def restart(self, name: str) -> None:
        self._act(lambda c: c.restart([name]))

    def describe(self, name: str) -> Description:
        with self._lock:
            return views.describe(self._engine, name)

    def log_paths(self, name: str) -> dict[str, Path]:
        return {s: log_file(self.home.log_dir(name), s) for s in STREAMS}

    def task_output(self, run_id: str, task_id: str) -> tuple[str | None, str | None]:
        return RunFiles(self.home.plan_run_dir(run_id)).task_output(task_id)

    def cancel_plan(self, run_id: str) -> str:
        return plan_cancelled(run_id, self._act(lambda c: c.cancel_plan(run_id).cancelled))

    def retry_plan(self, run_id: str) -> str:
        return plan_requeued(run_id, self._act(lambda c: c.retry_plan(run_id).requeued))

    def close(self) -> None:
        self._engine.close()
