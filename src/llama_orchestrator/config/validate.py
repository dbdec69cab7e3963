"""Checks of a whole home's configs, each problem as `file: field: message`.

Used by `config validate` (every problem, errors and warnings) and by `up`
(which refuses to start an instance with errors). Every check that needs the
file system lives here, so the config models stay pure parsing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from llama_orchestrator.config.binary import find_llama_server
from llama_orchestrator.config.command import check_extra_args
from llama_orchestrator.config.fit import GPU_BACKENDS, demand, on_cards, overcommits
from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.config.parse import (
    load_config,
    load_settings,
    parse_upstream,
    salvage_config,
)
from llama_orchestrator.config.upstream import UpstreamConfig
from llama_orchestrator.errors import BinaryNotFound, ConfigError, Problem, UserError
from llama_orchestrator.gpus import builds
from llama_orchestrator.gpus.discover import Discovery, discover
from llama_orchestrator.home import Home, declares_upstream
from llama_orchestrator.models.catalog import REF_PREFIX, is_ref, model_file
from llama_orchestrator.models.gguf import ModelError, is_gguf, read_model
from llama_orchestrator.names import alias_names, tag_model

__all__ = [
    "Loaded",
    "load_all",
    "upstream_configs",
    "check_instance",
    "validate_home",
    "hosts_overlap",
    "pinned_devices",
    "vram_problems",
]

_WILDCARDS = {"0.0.0.0", "::", "[::]", ""}


@dataclass
class Loaded:
    """One instance folder: its config, or why it could not be parsed. An
    upstream's folder has `upstream` (and no `config`: nothing to launch)."""

    name: str
    path: Path
    config: InstanceConfig | None
    problems: list[Problem]
    upstream: UpstreamConfig | None = None
    #: a config that fails its schema, without the fields at fault (see
    #: `parse.salvage_config`): `config validate` checks the rest of it too
    salvaged: InstanceConfig | None = None


def load_all(home: Home) -> list[Loaded]:
    out = []
    for name in home.instance_names():
        path = home.config_path(name)
        text = ""
        try:
            text = path.read_text(encoding="utf-8")
            if declares_upstream(text):
                out.append(Loaded(name, path, None, [], parse_upstream(text, str(path), name)))
            else:
                out.append(Loaded(name, path, load_config(path), []))
        except ConfigError as exc:
            out.append(Loaded(name, path, None, exc.problems, salvaged=salvage_config(text)))
        except OSError as exc:
            out.append(Loaded(name, path, None, [Problem(str(path), "", f"cannot be read: {exc}")]))
    return out


def upstream_configs(home: Home) -> dict[str, UpstreamConfig]:
    """The home's upstreams (those whose config parses), by name."""
    return {x.name: x.upstream for x in load_all(home) if x.upstream is not None}


def hosts_overlap(a: str, b: str) -> bool:
    return a == b or a in _WILDCARDS or b in _WILDCARDS or {a, b} <= {"127.0.0.1", "localhost"}


def _same_node(a: InstanceConfig, b: InstanceConfig) -> bool:
    node_a = a.placement.node if a.placement else None
    return node_a is not None and node_a == (b.placement.node if b.placement else None)


def check_instance(home: Home, item: Loaded, others: list[Loaded]) -> list[Problem]:
    """Problems of one parsed instance beyond its schema."""
    cfg = item.config
    assert cfg is not None
    file = str(item.path)
    problems: list[Problem] = []

    clustered = home.on_cluster()
    for other in others:
        oc = other.config
        if other.name == item.name or oc is None:
            continue
        if oc.server.port == cfg.server.port and (
            # on a cluster, each node has its ports: a clash is two pinned to one
            # node (the daemon places the others apart, `cluster.placement`)
            _same_node(cfg, oc) if clustered else hosts_overlap(oc.server.host, cfg.server.host)
        ):
            problems.append(
                Problem(
                    file,
                    "server.port",
                    f"port {cfg.server.port} is also used by instance '{other.name}'; "
                    "give each instance its own port",
                )
            )

    model = model_file(cfg.model.path, item.path.parent)
    if is_ref(cfg.model.path) and not model.exists():
        ref = cfg.model.path[len(REF_PREFIX) :]
        problems.append(
            Problem(
                file,
                "model.path",
                f"model {cfg.model.path} has not been pulled; run `llama-orch models pull {ref}` "
                "(nothing is downloaded at start)",
            )
        )
    elif model.is_dir():
        problems.append(
            Problem(file, "model.path", f"{model} is a folder; name a .gguf file in it")
        )
    elif not model.exists():
        problems.append(
            Problem(
                file,
                "model.path",
                f"model file {model} does not exist; fix the path (relative paths start at "
                f"{item.path.parent})",
            )
        )
    elif not model.is_file() or not is_gguf(model):
        problems.append(
            Problem(
                file,
                "model.path",
                f"{model} is not a GGUF model (its first bytes are not 'GGUF'); point it at a .gguf file",
            )
        )
    else:
        try:
            read_model(model)  # a truncated file would crash-loop llama-server
        except ModelError as exc:
            problems.append(Problem(file, "model.path", exc.message))

    try:
        binary = find_llama_server(cfg.binary, home.root, item.path.parent)
    except BinaryNotFound as exc:
        problems.append(Problem(file, "binary" if cfg.binary else "", str(exc)))
    else:
        if cfg.gpu.backend in GPU_BACKENDS:
            problems += build_problems(
                file, cfg.gpu.backend, builds.probe(binary, build_cache(home))
            )

    if cfg.autostart and cfg.on_demand is not None:
        problems.append(
            Problem(
                file,
                "autostart",
                "an on-demand instance is started by the first request that names it, not with "
                "the daemon; remove autostart or on_demand",
                "warning",
            )
        )
    errors, warnings = check_extra_args(cfg.server.extra_args)
    problems += [Problem(file, "server.extra_args", e) for e in errors]
    problems += [Problem(file, "server.extra_args", w, "warning") for w in warnings]
    if cfg.server.host in _WILDCARDS - {""}:
        problems.append(
            Problem(
                file,
                "server.host",
                f"{cfg.server.host} exposes llama-server to the network; use 127.0.0.1 "
                "unless that is what you want",
                "warning",
            )
        )
    if cfg.gpu.backend == "cpu" and cfg.gpu.device_id is not None:
        problems.append(
            Problem(
                file,
                "gpu.device_id",
                "is ignored with backend 'cpu'; set gpu.backend",
                "warning",
            )
        )
    if (
        cfg.gpu.tensor_split
        and not cfg.gpu.auto
        and len(cfg.gpu.tensor_split) != max(1, len(cfg.gpu.devices))
    ):
        problems.append(
            Problem(
                file,
                "gpu.tensor_split",
                "needs one share per device in gpu.device_id; make the lists the same length",
            )
        )
    return problems


def build_cache(home: Home) -> Path:
    """Where the backends of each llama-server binary are remembered."""
    return home.state_dir / "builds.json"


def build_problems(file: str, backend: str, build: builds.Build) -> list[Problem]:
    """A GPU backend the binary was not built with: llama-server would run on
    the CPU, healthy, without a word (gpu.force does not change that)."""
    if not build.lacks(backend):
        return []
    want = builds.LABELS[backend]
    has = " and ".join(builds.LABELS[b] for b in sorted(build.backends))
    what = f"built for {has}, not {want}" if has else "a CPU-only build"
    return [
        Problem(
            file,
            "gpu.backend",
            f"the llama-server {build.binary} is {what}, so this instance would run on the CPU; "
            f"point `binary` (or $LLAMA_SERVER_BIN) at a {want} build of llama-server "
            '(see "GPU builds" in the docs), or set gpu.backend to "cpu"',
        )
    ]


def pinned_devices(items: list[Loaded]) -> dict[int, list[str]]:
    """GPU index -> names of the instances whose config pins it."""
    out: dict[int, list[str]] = {}
    for item in items:
        cfg = item.config
        if cfg is not None and cfg.gpu.backend in GPU_BACKENDS:
            for d in cfg.gpu.devices:
                out.setdefault(d, []).append(item.name)
    return out


def vram_problems(
    items: list[Loaded], find_gpus: Callable[[], Discovery], strict: bool = False
) -> list[Problem]:
    """Devices whose pinned instances (all of `items` running together) need more
    VRAM than the card has: warnings, or errors when `strict`. No GPU pinned
    anywhere means no discovery at all (CPU-only setups pay nothing)."""
    if not pinned_devices(items):
        return []
    found = find_gpus()
    demands: dict[str, dict[int, int]] = {}
    paths: dict[str, Path] = {}
    for item in items:
        cfg = item.config
        if cfg is None or cfg.gpu.backend not in GPU_BACKENDS or not cfg.gpu.devices:
            continue
        try:
            info = (
                None
                if cfg.gpu.vram_mib
                else read_model(model_file(cfg.model.path, item.path.parent))
            )
        except ModelError:
            continue  # check_instance reports an unreadable model
        demands[item.name] = on_cards(demand(cfg, info), cfg.gpu.backend, found.gpus)
        paths[item.name] = item.path
    severity = "error" if strict else "warning"
    return absent_devices(items, found) + [
        Problem(str(paths[oc.instances[-1][0]]), "gpu.device_id", oc.message(), severity)
        for oc in overcommits(demands, found.gpus)
    ]


#: what discovery asks, per backend, for the message when it finds nothing
ASKED = {
    "cuda": "NVML, nvidia-smi and rocm-smi report none",
    "rocm": "NVML, nvidia-smi and rocm-smi report none",
    "vulkan": "vulkaninfo lists no Vulkan device",
}


def absent_devices(items: list[Loaded], found: Discovery) -> list[Problem]:
    """Pinned indices of a backend that discovery lists devices for, but not
    that one: the backend would see no device and llama-server would silently
    run on the CPU (seen on a real H100 with CUDA_VISIBLE_DEVICES=7, and
    ggml-vulkan only logs "Invalid device index"). A pin on a machine where
    discovery finds nothing at all is refused too, unless the config says
    `gpu.force` (discovery may lack the tools the card needs)."""
    problems = []
    for item in items:
        cfg = item.config
        if cfg is None or not cfg.gpu.devices:
            continue
        backend = cfg.gpu.backend
        have = found.devices_of(backend)
        if have is None:
            continue  # nothing here asks that backend: no verdict
        # no card at all of what the backend asks (an AMD card on Vulkan alone is no CUDA card)
        nothing = (
            not have if backend == "vulkan" else not any(g.backend != "vulkan" for g in found.gpus)
        )
        if nothing and not cfg.gpu.force:
            problems.append(
                Problem(
                    str(item.path),
                    "gpu.device_id",
                    f"GPU {', '.join(map(str, cfg.gpu.devices))} is pinned but no GPU was found "
                    f"here ({ASKED[backend]}), so llama-server would run on the CPU; use backend "
                    '"cpu", install the driver tools, or set gpu.force: true to pin anyway',
                )
            )
            continue
        missing = [d for d in cfg.gpu.devices if d not in have]
        if have and missing:
            listed = ", ".join(f"{i} ({n})" for i, n in sorted(have.items()))
            problems.append(
                Problem(
                    str(item.path),
                    "gpu.device_id",
                    f"GPU {', '.join(map(str, missing))} is not on this machine, which has "
                    f'{backend} GPU {listed}; pin one of those, or use "auto".',
                )
            )
        software = (
            [d.index for d in found.vulkan or [] if d.software] if backend == "vulkan" else []
        )
        if slow := [d for d in cfg.gpu.devices if d in software]:
            problems.append(
                Problem(
                    str(item.path),
                    "gpu.device_id",
                    f"Vulkan device {', '.join(map(str, slow))} is {have[slow[0]]}, a software "
                    'renderer on the CPU: fine for a test, slower than backend "cpu" for work',
                    "warning",
                )
            )
    return problems


def validate_home(
    home: Home,
    names: list[str] | None = None,
    *,
    strict: bool = False,
    find_gpus: Callable[[], Discovery] = discover,
) -> list[Problem]:
    """Every problem of the named instances (all when None); VRAM is checked as
    if every always-on instance ran at once, with each on-demand one in turn
    (the router swaps those, so they need not fit together)."""
    # a config that fails its schema is checked without the fields at fault,
    # so that one pass reports every problem (its port, model file, GPUs)
    loaded = [
        x if x.salvaged is None else dataclasses.replace(x, config=x.salvaged)
        for x in load_all(home)
    ]
    selected = [x for x in loaded if names is None or x.name in names]
    problems: list[Problem] = []
    try:  # the daemon reads it at start: a typo there must show here, not there
        load_settings(home.settings_path)
    except ConfigError as exc:
        problems += exc.problems
    for item in selected:
        problems += item.problems
        if item.upstream is not None:
            problems += upstream_problems(item.path, item.upstream)
        if item.config is not None:
            faulted = {p.field for p in item.problems}
            problems += [
                p
                for p in check_instance(home, item, loaded)
                if not any(p.field == f or p.field.startswith(f"{f}.") for f in faulted)
            ]
    wanted = {x.name for x in selected}
    lazy = [x for x in loaded if x.config is not None and x.config.on_demand is not None]
    always = [x for x in loaded if x not in lazy]
    found = find_gpus() if pinned_devices(loaded) else Discovery("none", [])
    together: list[Problem] = []
    for group in [always] + [always + [x] for x in lazy]:
        together += [p for p in vram_problems(group, lambda: found, strict) if p not in together]
    together += cpu_thread_problems(loaded, os.cpu_count() or 1)
    return problems + [p for p in together if names is None or Path(p.file).parent.name in wanted]


def upstream_problems(path: Path, cfg: UpstreamConfig) -> list[Problem]:
    """An upstream's key must be where its config says (read again at each request)."""
    u = cfg.upstream
    if u.api_key_env and not os.environ.get(u.api_key_env):
        return [
            Problem(
                str(path),
                "upstream.api_key_env",
                f"${u.api_key_env} is not set here; the daemon reads it from its own "
                "environment (set it where the daemon starts, e.g. the service unit)",
                "warning",
            )
        ]
    if u.api_key_file and not (path.parent / u.api_key_file).expanduser().is_file():
        return [
            Problem(
                str(path),
                "upstream.api_key_file",
                f"no such file {path.parent / u.api_key_file}; write the key there",
            )
        ]
    return []


def cpu_thread_problems(items: list[Loaded], cores: int) -> list[Problem]:
    """CPU instances running together that ask for more threads than there are
    cores: each spins waiting for the others (measured: 3.5 instead of 3600
    tokens/s for two instances on 2 cores). A warning on the last of them.
    An instance without model.threads counts as all cores (llama-server's
    default)."""
    cpu = [x for x in items if x.config is not None and x.config.gpu.backend == "cpu"]
    if len(cpu) < 2:
        return []
    asked = [(x, x.config.model.threads or cores) for x in cpu if x.config is not None]
    total = sum(n for _, n in asked)
    if total <= cores:
        return []
    parts = ", ".join(
        f"{x.name} ({n} thread{'s' * (n != 1)}"
        + (")" if x.config is not None and x.config.model.threads else ", the default)")
        for x, n in asked
    )
    return [
        Problem(
            str(cpu[-1].path),
            "model.threads",
            f"CPU instances {parts} ask for {total} threads on {cores} cores and will slow "
            f"each other down many times over; set model.threads so they add up to {cores} "
            "or less.",
            "warning",
        )
    ]


def replicas_of(home: Home, alias: str) -> list[str]:
    """The instances serving `alias` (or the instance of that name), sorted."""
    loaded = [x for x in load_all(home) if x.config is not None]
    names = [
        x.name
        for x in loaded
        if x.config is not None and alias in alias_names(x.config.alias_or(x.name))
    ]
    if not names and alias in {x.name for x in loaded}:
        names = [alias]
    if not names:
        aliases = sorted({x.config.alias_or(x.name) for x in loaded if x.config is not None})
        raise UserError(
            f"No instance serves the alias '{alias}' (aliases: {', '.join(aliases) or 'none'}).",
            hint="`llama-orch ps` lists instances and their aliases.",
        )
    return sorted(names)


def model_names(home: Home) -> set[str]:
    """What a request (or a plan's task) may name: every alias and tags:<tag>
    (see `offered_names`)."""
    return offered_names(
        {x.name: x.config or x.upstream for x in load_all(home) if x.config or x.upstream}
    )


def offered_names(configs: Mapping[str, InstanceConfig | UpstreamConfig | None]) -> set[str]:
    """Every alias and tags:<tag> of these configs (by instance name), and each
    instance's whole tag set (`tags:a,b`), against which `names.offers`
    checks a request for several tags."""
    names: set[str] = set()
    for name, cfg in configs.items():
        if cfg is None:
            continue
        names.update(alias_names(cfg.alias_or(name)))
        names.update(f"tags:{t}" for t in cfg.tags)
        if len(cfg.tags) > 1:
            names.add(tag_model(cfg.tags))
    return names
