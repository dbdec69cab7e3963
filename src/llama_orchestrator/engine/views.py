"""Read-only views of an instance for people and programs: `describe`, GPU samples.

The CLI renders these; the dashboard and the daemon's API serve the same data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llama_orchestrator.config.binary import find_llama_server
from llama_orchestrator.config.fit import GPU_BACKENDS, demand
from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.config.parse import is_secret_name, redacted
from llama_orchestrator.config.validate import Loaded, build_cache, load_all, pinned_devices
from llama_orchestrator.engine import health
from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.engine.process import is_alive
from llama_orchestrator.engine.status import (
    Description,
    InstanceStatus,
    StatusReply,
    collect,
    iso,
    listening,
    upstream_view,
)
from llama_orchestrator.errors import BinaryNotFound, OrchError
from llama_orchestrator.gpus import builds
from llama_orchestrator.gpus.alerts import GpuStatus, check
from llama_orchestrator.gpus.leases import card_state, occupants
from llama_orchestrator.models.catalog import model_file
from llama_orchestrator.models.gguf import ModelError, estimate, read_model
from llama_orchestrator.states import RUNNING_STATES

__all__ = [
    "status_reply",
    "describe",
    "describe_upstream",
    "probe",
    "gpu_sample",
    "pinned",
    "pinned_gpu_warnings",
    "builds_in_use",
]


def pinned(engine: Engine, loaded: list[Loaded] | None = None) -> dict[int, list[str]]:
    """GPU index -> instances on it: pinned by config, or given it at start (`device_id: auto`)."""
    out = pinned_devices(load_all(engine.home) if loaded is None else loaded)
    for row in engine.store.all():
        if row.state in RUNNING_STATES and row.gpu_devices:
            for d in row.gpu_devices:
                if row.name not in out.setdefault(d, []):
                    out[d].append(row.name)
    return out


def gpu_sample(engine: Engine, busy: Callable[[str], bool] | None = None) -> GpuStatus:
    """Live GPUs of this home with the instances on each, each card's state and
    lease (`busy`: an instance has requests in flight, as the daemon knows);
    new alerts recorded as events."""
    loaded = load_all(engine.home)
    configs = {x.name: x.config for x in loaded if x.config is not None}
    status = check(
        pinned(engine, loaded),
        engine.store,
        engine.settings.gpu.temp_threshold,
        engine.find_gpus,
        {n: c.gpu.backend for n, c in configs.items()},
    )
    leases = {x.gpu: x for x in engine.store.leases()}
    on = occupants(
        engine.store.all(),
        lambda n: configs[n].gpu.devices if n in configs else [],
        lambda n: n in configs and configs[n].yield_to_scripts,
        busy or (lambda n: False),
    )
    for g in status.gpus:
        lease = leases.get(g.index)
        g.state = card_state(lease, on.get(g.index, ()))
        if lease is not None:
            g.lease = {"task": lease.task_id, "plan": lease.run_id, "since": iso(lease.since)}
    return status


def builds_in_use(engine: Engine) -> list[tuple[builds.Build, list[str]]]:
    """Each llama-server binary this home runs, with its GPU backends and the
    instances that run it (the default lookup's binary when none does)."""
    users: dict[Path, list[str]] = {}
    for item in load_all(engine.home):
        if item.config is None:
            continue
        try:
            binary = find_llama_server(item.config.binary, engine.home.root, item.path.parent)
        except BinaryNotFound:
            continue  # `config validate` says where it looked
        users.setdefault(binary, []).append(item.name)
    if not users:
        try:
            users[find_llama_server(None, engine.home.root)] = []
        except BinaryNotFound:
            return []
    cache = build_cache(engine.home)
    return [(builds.probe(b, cache), names) for b, names in users.items()]


def pinned_gpu_warnings(engine: Engine) -> list[str]:
    """Warnings about cards instances are pinned to; no discovery when none is."""
    if not pinned(engine):
        return []
    return gpu_sample(engine).warnings


def status_reply(engine: Engine) -> StatusReply:
    """What `ps` shows: every instance's status view, and card warnings."""
    return StatusReply(collect(engine), pinned_gpu_warnings(engine))


def on_nodes(engine: Engine) -> list[tuple[str, str, list[int]]]:
    """A cluster home's running instances as recorded: (name, node, cards)."""
    return [
        (r.name, r.node, r.gpu_devices or [])
        for r in engine.rows()
        if r.node is not None and r.state in RUNNING_STATES
    ]


def probe(engine: Engine, name: str) -> health.ProbeResult:
    """One instance's /health now, as `probe` asks it (down when not running)."""
    row = engine.rows([name])[0]
    loaded = {x.name: x for x in load_all(engine.home)}
    cfg = loaded[name].config if name in loaded else None
    host, port = listening(row, cfg)
    # a cluster node's server is not this machine's process: its row says whether it runs
    runs = row.state in RUNNING_STATES if row.node else is_alive(engine.ref(row))
    if port is None or not runs:
        return health.ProbeResult(health.DOWN, None, 0.0, f"instance is {row.state}")
    timeout = cfg.healthcheck.timeout if cfg else 5.0
    return health.probe(host, port, timeout, engine.get)


def describe_upstream(engine: Engine, name: str, seen: list[InstanceStatus]) -> dict[str, Any]:
    """An external upstream: its `ps` entry as the daemon sees it (`seen`),
    its config (the key's source, never the key), what it cost in the last
    24 hours, its recent events."""
    from llama_orchestrator.upstreams import DAY_S, usage_summary

    cfg = engine.upstreams()[name]
    entry = next((x for x in seen if x["name"] == name), None) or upstream_view(name, cfg)
    spent = usage_summary(
        u for u in engine.store.usage(since=engine.clock() - DAY_S) if u.upstream == name
    )["total"]
    return {
        **entry,
        "config_path": str(engine.home.config_path(name)),
        "config": cfg.model_dump(mode="json", exclude_none=True),
        "last_24h": spent,
        "events": [{**e.to_json(), "ts": iso(e.ts)} for e in engine.store.events(name, limit=10)],
    }


def describe(engine: Engine, name: str) -> Description:
    """Everything about one instance: `ps` keys plus config (secrets hidden),
    exact command and added environment, model and GPUs, logs, recent events."""
    data = Description(**collect(engine, [name])[0])
    item = next((x for x in load_all(engine.home) if x.name == name), None)
    if item is not None:
        data["config_path"] = str(item.path)
        if item.config is not None:
            data["config"] = redacted(item.config)
            data.update(_model_and_gpus(engine, item.config, item.path.parent))  # type: ignore[typeddict-item]
            try:
                (prepared,) = engine.prepare([name])
                data["build"] = builds.probe(
                    Path(prepared.launch.argv[0]), build_cache(engine.home)
                ).to_json()
                data["command"] = prepared.launch.argv
                data["env"] = {
                    k: ("********" if is_secret_name(k) else v)
                    for k, v in prepared.launch.added_env.items()
                }
            except OrchError as exc:
                data["command_error"] = str(exc)
    log_dir = engine.home.log_dir(name)
    data["logs"] = {s: str(log_dir / f"{s}.log") for s in ("stdout", "stderr")}
    data["events"] = [{**e.to_json(), "ts": iso(e.ts)} for e in engine.store.events(name, limit=10)]
    return data


def _model_and_gpus(engine: Engine, cfg: InstanceConfig, folder: Path) -> dict[str, Any]:
    """The model's metadata and estimate, and live figures of the pinned GPUs."""
    try:
        info = read_model(model_file(cfg.model.path, folder))
    except ModelError as exc:
        return {"model_error": exc.message}
    gpu = cfg.gpu.backend in GPU_BACKENDS
    est = estimate(info, cfg.model.context_size, cfg.server.parallel, cfg.gpu.layers if gpu else 0)
    per_device = demand(cfg, info)  # gpu.vram_mib when set
    extra: dict[str, Any] = {
        "model": {
            **info.to_json(),
            "estimate_gpu_bytes": sum(per_device.values())
            if cfg.gpu.vram_mib is not None
            else est.gpu_bytes,
            "estimate_per_device": per_device,
        }
    }
    if gpu and cfg.gpu.devices:
        live = {g.index: g for g in gpu_sample(engine).gpus}
        extra["gpus"] = [
            live[d].to_json() if d in live else {"index": d, "missing": True}
            for d in cfg.gpu.devices
        ]
    return extra
