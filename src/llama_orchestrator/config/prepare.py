"""Before anything starts: validate instances fully and build their launches.

All or nothing: every problem of every named instance is collected into one
ConfigError, so a typo in one config never leaves half of an `up --all` started.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llama_orchestrator.config.binary import find_llama_server
from llama_orchestrator.config.command import Launch, build_launch
from llama_orchestrator.config.fit import GPU_BACKENDS, pick_devices
from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.config.validate import (
    check_instance,
    cpu_thread_problems,
    load_all,
    vram_problems,
)
from llama_orchestrator.errors import ConfigError, Problem, UnknownInstance, UserError
from llama_orchestrator.gpus.discover import Discovery, seen_by
from llama_orchestrator.home import Home
from llama_orchestrator.models.catalog import model_file
from llama_orchestrator.models.gguf import read_model

__all__ = ["Prepared", "prepare"]


@dataclass
class Prepared:
    """Everything needed to start one instance, checked before anything runs."""

    name: str
    config: InstanceConfig
    config_path: Path
    launch: Launch
    warnings: list[str] = field(default_factory=list)
    #: the GPUs this run gets (from the config, or chosen now for `device_id: auto`)
    devices: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def prepare(
    home: Home,
    names: list[str],
    running: set[str],
    base_env: Mapping[str, str],
    find_gpus: Callable[[], Discovery],
    strict: bool = False,
    leased: frozenset[int] = frozenset(),
    cluster: bool = False,
) -> list[Prepared]:
    """Check the named instances and build their launches; raise ConfigError
    listing every problem. VRAM is summed over `running` plus `names`: over a
    card's total it is a warning, an error with `strict`. `device_id: auto`
    never picks a `leased` card (a plan's script task holds it). `cluster`:
    no look at this machine's cards or cores (a cluster's nodes run them)."""
    loaded = {x.name: x for x in load_all(home)}
    problems: list[Problem] = []
    prepared: list[Prepared] = []
    for name in names:
        item = loaded.get(name)
        if item is None:
            raise UnknownInstance(name, sorted(loaded))
        if item.config is None:
            problems += item.problems
            continue
        found = check_instance(home, item, list(loaded.values()))
        if any(p.severity == "error" for p in found):
            problems += [p for p in found if p.severity == "error"]
            continue
        warnings = [str(p) for p in found]
        notes: list[str] = []
        folder = item.path.parent
        cfg, devices = (
            (item.config, item.config.gpu.devices)
            if cluster
            else _resolve_auto(item.config, folder, find_gpus, notes, leased)
        )
        binary = find_llama_server(cfg.binary, home.root, folder)
        launch = build_launch(
            cfg, name, binary, model_file(cfg.model.path, folder), base_env, home.root
        )
        prepared.append(Prepared(name, item.config, item.path, launch, warnings, devices, notes))
    if problems:
        raise ConfigError(problems)
    if cluster:
        return prepared
    together = sorted((running | set(names)) & set(loaded))
    vram = vram_problems([loaded[n] for n in together], find_gpus, strict)
    vram += cpu_thread_problems([loaded[n] for n in together], os.cpu_count() or 1)
    if any(p.severity == "error" for p in vram):
        raise ConfigError(vram)
    for problem in vram:
        for prep in prepared:
            if Path(problem.file) == prep.config_path:
                prep.warnings.append(str(problem))
    return prepared


def _resolve_auto(
    cfg: InstanceConfig,
    folder: Path,
    find_gpus: Callable[[], Discovery],
    notes: list[str],
    leased: frozenset[int] = frozenset(),
) -> tuple[InstanceConfig, list[int]]:
    """For `device_id: auto` on a GPU backend: a copy of the config pinned to
    the card(s) with the most free VRAM now. Other configs pass unchanged."""
    if not (cfg.gpu.auto and cfg.gpu.backend in GPU_BACKENDS):
        return cfg, cfg.gpu.devices
    info = read_model(model_file(cfg.model.path, folder))
    g = cfg.gpu
    cards = seen_by(find_gpus().gpus, g.backend)  # indexed as the backend counts them
    if cards and all(c.index in leased for c in cards):
        raise UserError(
            "Every GPU is leased to a plan's script task now, so `device_id: auto` has no card.",
            hint="It can start once a lease ends; `llama-orch gpus` shows the leases.",
        )
    devices = pick_devices(
        info,
        cfg.model.context_size,
        cfg.server.parallel,
        g.layers,
        [c for c in cards if c.index not in leased],
    )
    notes.append(f"device_id auto chose GPU {','.join(map(str, devices))} (most free VRAM)")
    pinned = cfg.model_copy(deep=True)
    pinned.gpu.device_id = devices
    return pinned, devices
