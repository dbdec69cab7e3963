"""What `ps`, `describe` and the dashboard show about instances.

`status_view` is pure (config + row + clock -> dict with the DESIGN §8 keys);
`collect` gathers the inputs, probing unsupervised running instances
concurrently so `ps` reports the health it sees now. It only reads: what a
look sees is shown, never written (the daemon, or the command that started
an instance, owns its health; see `engine.step`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypedDict

from llama_orchestrator.engine import health, logs
from llama_orchestrator.engine.policy import idle_left
from llama_orchestrator.models.catalog import model_file
from llama_orchestrator.states import RUNNING_STATES
from llama_orchestrator.states import InstanceState as S
from llama_orchestrator.store.rows import InstanceRow

if TYPE_CHECKING:  # the status view's types; `ps` through the daemon needs no config
    from llama_orchestrator.config.instance import InstanceConfig
    from llama_orchestrator.config.upstream import UpstreamConfig
    from llama_orchestrator.engine.lifecycle import Engine

__all__ = [
    "InstanceStatus",
    "Description",
    "StatusReply",
    "Activity",
    "status_view",
    "on_demand_view",
    "observed_state",
    "collect",
    "with_loads",
    "with_upstreams",
    "upstream_view",
    "iso",
    "listening",
]

PS_PROBE_TIMEOUT = 1.0
_PROBED = (S.STARTING, S.HEALTHY, S.UNHEALTHY)


class InstanceStatus(TypedDict):
    """One instance as `ps --json`, the CLI's tables and the dashboard see it
    (DESIGN §8's keys, and more): the one status view, built by `status_view`."""

    name: str
    state: str
    desired: str
    pid: int | None
    host: str | None
    port: int | None
    alias: str | None
    model_path: str | None
    backend: str | None
    gpu_devices: list[int] | str
    restarts: int
    started_at: str | None
    uptime_s: float | None
    exit_code: int | None
    last_exit: dict[str, Any] | None
    supervised: bool
    next_restart_at: str | None
    next_try_s: float | None
    config_error: str | None
    #: the config was changed since the running process started (restart applies it)
    config_changed: bool
    on_demand: bool
    last_used_at: str | None
    idle_stop_in_s: float | None
    #: [k, n]: load k of the n loading or waiting (the daemon's load queue)
    load_position: list[int] | None
    #: percent of the model read, while it loads (llama.cpp's progress dots)
    load_progress: int | None
    #: an external upstream: its URL, and why it does not answer (None for ours)
    upstream: dict[str, Any] | None
    #: a cluster home's node: where it runs, else where it is pinned (None: this machine)
    node: str | None


class Description(InstanceStatus, total=False):
    """`describe`: the status view plus what only a close look shows."""

    config_path: str
    config: dict[str, Any]  # secrets hidden
    command: list[str]
    env: dict[str, str]  # what the launch adds, secrets hidden
    build: dict[str, Any]  # the llama-server binary and its GPU backends (gpus.builds)
    command_error: str
    model: dict[str, Any]
    model_error: str
    gpus: list[dict[str, Any]]
    logs: dict[str, str]
    events: list[dict[str, Any]]


@dataclass
class StatusReply:
    """`ps`: every instance's status view, and warnings about the cards they use
    (made by `engine.views.status_reply`, here or in the daemon, which sends it as is)."""

    instances: list[InstanceStatus]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Activity:
    """What only the daemon knows (`GET /v1/activity`): its load queue
    ({name: [k, n]}, load k of the n loading or waiting), the router's
    requests in flight per instance, and what its checks of the external
    upstreams found."""

    loads: dict[str, list[int]] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    #: the external upstreams as the daemon checks them: {name: {state, error, ...}}
    upstreams: dict[str, dict[str, Any]] = field(default_factory=dict)


class OnDemandStatus(TypedDict):
    on_demand: bool
    last_used_at: str | None
    idle_stop_in_s: float | None


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def listening(row: InstanceRow, cfg: InstanceConfig | None) -> tuple[str, int | None]:
    """Where an instance's server listens: a running process where it was
    started (its config may have changed since), else where its config says."""
    if row.state in RUNNING_STATES and row.port:
        return row.host or "127.0.0.1", row.port
    if cfg is not None:
        return cfg.server.host, cfg.server.port
    return row.host or "127.0.0.1", row.port


def status_view(
    name: str,
    cfg: InstanceConfig | None,
    row: InstanceRow,
    now: float,
    config_dir: Any = None,
    config_error: str | None = None,
    load_percent: int | None = None,
) -> InstanceStatus:
    """One `ps --json` entry (`load_percent`: of a starting one, from its log)."""
    running = row.state in RUNNING_STATES
    host, port = listening(row, cfg)
    model_path = None
    if cfg is not None:
        model_path = (
            str(model_file(cfg.model.path, config_dir))
            if config_dir is not None
            else cfg.model.path
        )
    return {
        "name": name,
        "state": row.state.value,
        "desired": row.desired.value,
        "pid": row.pid if running else None,
        "host": host,
        "port": port,
        "alias": cfg.alias_or(name) if cfg else None,
        "model_path": model_path,
        "backend": cfg.gpu.backend if cfg else None,
        "gpu_devices": row.gpu_devices
        if running and row.gpu_devices is not None
        else (cfg.gpu.devices if cfg else []),
        "restarts": row.restarts,
        "started_at": iso(row.started_at) if running else None,
        "uptime_s": round(now - row.started_at, 1) if running and row.started_at else None,
        "exit_code": row.exit_code,
        "last_exit": {**row.last_exit, "at": iso(row.last_exit.get("at"))}
        if row.last_exit
        else row.last_exit,
        "supervised": row.supervised,
        "next_restart_at": iso(row.next_restart_at),
        "next_try_s": round(max(0.0, row.next_restart_at - now), 1)
        if row.state == S.BACKOFF and row.next_restart_at is not None
        else None,
        "config_error": config_error,
        "config_changed": running
        and cfg is not None
        and row.config_digest is not None
        and row.config_digest != cfg.digest(),
        **on_demand_view(cfg, row, now),
        "load_position": None,
        "load_progress": load_percent,
        "upstream": None,
        # a cluster home: the node it runs on, else the one it is pinned to
        "node": row.node
        if running and row.node
        else (cfg.placement.node if cfg is not None and cfg.placement else None),
    }


def upstream_view(name: str, cfg: UpstreamConfig, state: str = "unchecked") -> InstanceStatus:
    """An external upstream's `ps --json` entry: `unchecked` until the
    daemon (which checks it) says `checking`, `healthy` or `unhealthy`."""
    from urllib.parse import urlsplit

    parts = urlsplit(cfg.upstream.url)
    return {
        "name": name,
        "state": state,
        "desired": "running",
        "pid": None,
        "host": parts.hostname,
        "port": parts.port or (443 if parts.scheme == "https" else 80),
        "alias": cfg.alias_or(name),
        "model_path": cfg.remote_model(name),
        "backend": "upstream",
        "gpu_devices": [],
        "restarts": 0,
        "started_at": None,
        "uptime_s": None,
        "exit_code": None,
        "last_exit": None,
        "supervised": False,
        "next_restart_at": None,
        "next_try_s": None,
        "config_error": None,
        "config_changed": False,
        "on_demand": False,
        "last_used_at": None,
        "idle_stop_in_s": None,
        "load_position": None,
        "load_progress": None,
        "upstream": {"url": cfg.upstream.url, "error": None, "checked_at": None},
        "node": None,
    }


def on_demand_view(cfg: InstanceConfig | None, row: InstanceRow, now: float) -> OnDemandStatus:
    """`on_demand`, `last_used_at` and `idle_stop_in_s`: the idle countdown of a
    running on-demand instance the daemon supervises (it is what stops them; it
    keeps last_used_at current while requests are in flight, so the countdown
    never runs during one)."""
    od = cfg.on_demand if cfg else None
    last = row.last_used_at
    running = row.state in RUNNING_STATES
    left = None
    if od is not None and running and row.supervised and row.state != S.STOPPING:
        left = idle_left(max(last or 0.0, row.started_at or 0.0), od.idle_ttl, False, now)
    return {
        "on_demand": od is not None,
        "last_used_at": iso(last),
        "idle_stop_in_s": None if left is None else round(left, 1),
    }


def with_loads(items: list[InstanceStatus], loads: dict[str, list[int]]) -> None:
    """Each one's place in the daemon's load queue (`load_position`)."""
    for item in items:
        item["load_position"] = loads.get(item["name"])


def with_upstreams(items: list[InstanceStatus], upstreams: dict[str, dict[str, Any]]) -> None:
    """Each upstream's state as the daemon's checks found it (`unchecked` without them)."""
    for item in items:
        seen = upstreams.get(item["name"])
        if item["upstream"] is not None and seen is not None:
            item["state"] = seen["state"]
            item["upstream"] = {**item["upstream"], **seen}


def observed_state(current: S, probe: health.ProbeResult) -> S:
    """The state one look at an unsupervised running instance shows (pure; a
    view for `ps`, not a verdict: nothing is written or restarted for it).

    A model still loading, or a server not listening yet, keeps `starting`;
    anything else that is not a 200 is `unhealthy`."""
    if probe.ok:
        return S.HEALTHY
    if current == S.STARTING and probe.status in (health.LOADING, health.DOWN):
        return S.STARTING
    return S.UNHEALTHY


def collect(
    engine: Engine, names: list[str] | None = None, probe: bool = True
) -> list[InstanceStatus]:
    """Status of the named instances (all when None), sorted by name."""
    from llama_orchestrator.config.validate import load_all

    loaded = {x.name: x for x in load_all(engine.home)}
    upstreams = {x.name: x.upstream for x in loaded.values() if x.upstream is not None}
    ours = None if names is None else [n for n in names if n not in upstreams]
    # `supervised` as it is now: a row keeps the flag when its daemon is killed
    rows = [
        replace(r, supervised=r.supervised and engine.daemon_alive()) for r in engine.rows(ours)
    ]
    if probe:
        todo = [
            (i, listening(row, None))
            for i, row in enumerate(rows)
            if not row.supervised
            and row.state in _PROBED
            and row.port is not None
            and row.name in loaded
            and loaded[row.name].config is not None
        ]
        if todo:

            def one(t: tuple[int, tuple[str, int | None]]) -> health.ProbeResult:
                host, port = t[1]
                assert port is not None
                return health.probe(host, port, PS_PROBE_TIMEOUT, engine.get)

            from concurrent.futures import ThreadPoolExecutor  # ~17 ms: only when probing

            with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
                probes = list(pool.map(one, todo))
            for (i, _), p in zip(todo, probes, strict=True):
                rows[i] = replace(rows[i], state=observed_state(rows[i].state, p))
    now = engine.clock()
    out = []
    for row in rows:
        item = loaded.get(row.name)
        cfg = item.config if item else None
        err = "; ".join(str(p) for p in item.problems) if item and item.problems else None
        percent = (
            logs.load_progress(engine.home.log_dir(row.name)).percent
            if row.state == S.STARTING
            else None
        )
        out.append(
            status_view(row.name, cfg, row, now, item.path.parent if item else None, err, percent)
        )
    recorded = {r.name for r in rows}
    for name, up in upstreams.items():
        if (names is None or name in names) and name not in recorded:
            out.append(upstream_view(name, up))
    return sorted(out, key=lambda s: s["name"])
