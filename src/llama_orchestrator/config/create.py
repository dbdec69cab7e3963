"""`init`: write a new instance config (atomically), choosing a free port."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from llama_orchestrator import platform
from llama_orchestrator.config.fit import GPU_BACKENDS, pick_devices
from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.config.parse import pydantic_problems, save_config
from llama_orchestrator.config.validate import (
    ASKED,
    Loaded,
    absent_devices,
    check_instance,
    hosts_overlap,
    load_all,
)
from llama_orchestrator.errors import ConfigError, PortConflict, UserError
from llama_orchestrator.gpus.discover import Discovery, GpuInfo, discover, seen_by
from llama_orchestrator.home import Home, check_name
from llama_orchestrator.models.catalog import model_file
from llama_orchestrator.models.gguf import ModelError, ModelInfo, estimate, is_gguf, read_model
from llama_orchestrator.units import human_bytes

__all__ = ["create_instance", "pick_port", "Created", "FIRST_PORT", "DEFAULT_CTX"]

FIRST_PORT = 8001
DEFAULT_CTX = 4096


@dataclass
class Created:
    path: Path
    notes: list[str] = field(default_factory=list)  # what was chosen for the user, and why
    replaced: bool = False  # an existing config was overwritten (--force)


def pick_port(
    taken: set[int], is_free: Callable[[int], bool], first: int = FIRST_PORT, last: int = 65535
) -> int:
    """The first port from `first` up that no instance uses and nothing listens on."""
    for port in range(first, last + 1):
        if port not in taken and is_free(port):
            return port
    raise PortConflict(f"No free port between {first} and {last}.", hint="Pass --port.")


def create_instance(
    home: Home,
    name: str,
    *,
    model: str | None = None,
    port: int | None = None,
    host: str | None = None,
    backend: str | None = None,
    gpus: list[int] | Literal["auto"] | None = None,
    layers: int | None = None,
    ctx: int | None = None,
    parallel: int | None = None,
    threads: int | None = None,
    alias: str | None = None,
    tags: list[str] | None = None,
    extra_args: list[str] | None = None,
    binary: str | None = None,
    force: bool = False,
    find_gpus: Callable[[], Discovery] = discover,
    locate: Callable[[str], tuple[Path, list[str]]] | None = None,
) -> Created:
    """Write `instances/NAME/config.json`.

    The model path is made absolute from the caller's working directory (a
    relative path in the file would be read against the config's folder, not
    where the user typed it); `locate`, when given, turns `model` into a local
    path first (an `hf://` reference pulled now) and says what it did. Unset `ctx` becomes min(model context, 4096);
    `gpus="auto"` takes the device(s) with the most free VRAM that hold the
    model; unset `layers` on a GPU backend becomes all when the estimate fits.

    With `force` over an existing config, what is not given is kept from it
    (its port, alias, threads, health check, restart policy ...): `None` (or
    an empty list) means "not given". `binary` (a llama-server build, e.g. a
    CUDA one) is made absolute as the model path is."""
    check_name(name)
    notes: list[str] = []
    path = home.config_path(name)
    if path.exists() and not force:
        raise UserError(
            f"Instance '{name}' already exists ({path}).",
            hint="Use --force to overwrite it, or pick another name.",
        )
    loaded = load_all(home)
    old = _old_config(loaded, name, notes)
    # what init has no flag for (health check, restart policy, env ...) comes along
    base = old.model_dump(mode="json", by_alias=True, exclude_defaults=True) if old else {}
    host = host or (old.server.host if old else "127.0.0.1")
    same_backend = old is not None and backend in (None, old.gpu.backend)
    if gpus is not None and backend is None and (old is None or old.gpu.backend == "cpu"):
        raise UserError(
            f"--gpu {_gpus_arg(gpus)} pins a GPU, but the instance's backend is cpu, which "
            "uses none; nothing was written.",
            hint="Add --backend cuda (or rocm, vulkan, metal), or leave --gpu out.",
        )
    backend = backend or (old.gpu.backend if old else "cpu")
    if old is not None and same_backend:  # a card pinned for another backend is not one for this
        if gpus is None and old.gpu.device_id is not None:
            gpus = "auto" if old.gpu.auto else old.gpu.devices
        layers = old.gpu.layers if layers is None else layers
    if old is not None:
        notes.append("what was not given is kept from the old config")
        parallel = parallel or old.server.parallel
        ctx = ctx or old.model.context_size
        threads = threads or old.model.threads
        alias = alias or old.model.alias
        tags = tags or list(old.tags)
        extra_args = extra_args or list(old.server.extra_args)
    parallel = parallel or 1
    others = [x for x in loaded if x.name != name and x.config is not None]
    held = {  # by a config that fails validation: it means to use that port all the same
        port: x.name
        for x in loaded
        if x.name != name and x.config is None and x.upstream is None
        for port in [_port_of_broken(x.path, host)]
        if port is not None
    }
    taken = {
        x.config.server.port
        for x in others
        if x.config and hosts_overlap(x.config.server.host, host)
    } | set(held)
    if port is None and old is not None and old.server.port not in taken:
        port = old.server.port  # its own: a running instance holds it, so it looks taken
    if port is None:
        port = pick_port(taken, lambda p: platform.port_is_free(host, p))
        notes.append(f"port {port} (the first free one from {FIRST_PORT}; --port to choose)")
    elif port in taken:
        owner = held.get(port) or next(
            x.name for x in others if x.config and x.config.server.port == port
        )
        raise PortConflict(
            f"Port {port} is already used by instance '{owner}'.",
            hint="Pick another --port, or leave it out to get a free one.",
        )
    if model is None:
        if old is None:
            raise UserError(
                f"Instance '{name}' needs a model; nothing was written.",
                hint="Pass --model (a .gguf file, hf://OWNER/REPO:QUANT or a pulled model's ID).",
            )
        model_path = model_file(old.model.path, path.parent)
    elif locate is not None:  # after the checks above: never pull for an init that fails
        model_path, located = locate(model)
        notes += located
    else:
        model_path = Path(model).expanduser().absolute()
    if model_path.is_dir():
        ggufs = sorted(p.name for p in model_path.glob("*.gguf"))[:3]
        raise UserError(
            f"{model_path} is a folder, not a model file; nothing was written.",
            hint=f"Name one of its .gguf files ({', '.join(ggufs)})."
            if ggufs
            else "Name a .gguf file (this folder holds none).",
        )
    if not model_path.is_file():
        raise UserError(
            f"The model file {model_path} does not exist; nothing was written.",
            hint="Check --model (the path of a .gguf file), or name one on Hugging Face: "
            "--model hf://OWNER/REPO:QUANT.",
        )
    if not is_gguf(model_path):
        raise ModelError(
            f"{model_path} is not a GGUF model (its first bytes are not 'GGUF'); nothing was written.",
            hint="Point --model at a .gguf file.",
        )
    info: ModelInfo | None = None
    try:
        info = read_model(model_path)
    except ModelError as exc:
        notes.append(f"could not read the model's metadata ({exc.message}); defaults used")
    if ctx is None:
        ctx = min(info.context_length or DEFAULT_CTX, DEFAULT_CTX) if info else DEFAULT_CTX
        notes.append(f"context size {ctx} tokens")
    devices: list[int] = []
    found: Discovery | None = None  # discovered once, when needed
    if backend in GPU_BACKENDS and (gpus == "auto" or layers is None):
        found = find_gpus()
        cards = seen_by(found.gpus, backend)  # indexed as `backend` counts them
        if gpus == "auto":
            if info is None:
                raise UserError("--gpu auto needs the model's metadata.", hint="Check --model.")
            devices = pick_devices(info, ctx, parallel, layers, cards)
            notes.append(f"--gpu auto chose GPU {','.join(map(str, devices))} (most free VRAM)")
        else:
            devices = list(gpus or [])
        if layers is None and info is not None and devices:
            layers = _all_layers_if_they_fit(info, ctx, parallel, devices, cards, notes)
    elif isinstance(gpus, list):
        devices = gpus
    old_gpu = base.get("gpu", {}) if same_backend else {}
    gpu: dict[str, Any] = {
        **{k: v for k, v in old_gpu.items() if k not in ("device_id", "layers")},
        "backend": backend,
    }
    if devices:
        gpu["device_id"] = devices[0] if len(devices) == 1 else devices
    if layers is not None:
        gpu["layers"] = layers
    model_section: dict[str, Any] = {
        **base.get("model", {}),
        # kept as written when not given (relative, or an hf:// reference)
        "path": old.model.path if model is None and old is not None else str(model_path),
        "context_size": ctx,
    }
    server: dict[str, Any] = {
        **base.get("server", {}),
        "host": host,
        "port": port,
        "parallel": parallel,
    }
    data: dict[str, Any] = {
        **base,  # what init has no flag for: health check, restart policy, env ...
        "name": name,
        "model": model_section,
        "server": server,
        "gpu": gpu,
    }
    if binary is not None:  # absolute, as --model: the config is read from elsewhere
        data["binary"] = str(Path(binary).expanduser().absolute())
    for section, key, value in (
        (model_section, "threads", threads),
        (model_section, "alias", alias),
        (server, "extra_args", list(extra_args or [])),
        (data, "tags", list(tags or [])),
    ):
        if value:
            section[key] = value
    try:
        cfg = InstanceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(pydantic_problems(f"init {name}", exc)) from None
    # the checks `config validate` and `up` make: what init writes, up starts
    item = Loaded(name, path, cfg, [])
    checked = check_instance(home, item, others)
    if cfg.gpu.backend in ASKED and cfg.gpu.devices and not cfg.gpu.auto:
        found = found if found is not None else find_gpus()
        absent = absent_devices([item], found)
        checked += absent
        refused = [p for p in absent if p.severity == "error"]
        if refused and force and not found.devices_of(cfg.gpu.backend):  # no GPU at all
            cfg.gpu.force = True  # what --force asked for: up uses the pin too
            notes.append("gpu.force set: the pin is used although no GPU was found")
    problems = [p for p in checked if p.severity == "error"]
    if problems and not force:
        raise ConfigError(
            problems, hint="Nothing was written; fix it, or --force to write it anyway."
        )
    notes += [f"warning: {p.field}: {p.message}" for p in checked if p.severity == "warning"]
    if not home.instances_dir.is_dir():
        notes.insert(0, f"created a new home at {home.root}")
    save_config(path, cfg)
    return Created(path, notes, replaced=old is not None)


def _port_of_broken(path: Path, host: str) -> int | None:
    """The port a config that fails validation names, when it can be read
    (and on a host that overlaps `host`)."""
    try:
        server = json.loads(path.read_text()).get("server", {})
    except (OSError, ValueError, AttributeError):
        return None
    port = server.get("port") if isinstance(server, dict) else None
    other = server.get("host", "127.0.0.1") if isinstance(server, dict) else "127.0.0.1"
    if isinstance(port, int) and isinstance(other, str) and hosts_overlap(other, host):
        return port
    return None


def _gpus_arg(gpus: list[int] | Literal["auto"]) -> str:
    return gpus if isinstance(gpus, str) else ",".join(str(g) for g in gpus)


def _old_config(loaded: list[Loaded], name: str, notes: list[str]) -> InstanceConfig | None:
    """The config `--force` overwrites, as `load_all` read it (None, said, if
    it is not valid: it is then written anew)."""
    mine = next((x for x in loaded if x.name == name), None)
    if mine is None or not mine.path.exists():
        return None
    if mine.config is None:
        why = "; ".join(str(p) for p in mine.problems) or "it could not be read"
        notes.append(f"the old {mine.path.name} is not valid ({why}); it is written anew")
    return mine.config


def _all_layers_if_they_fit(
    info: ModelInfo,
    ctx: int,
    parallel: int,
    devices: list[int],
    gpus: list[GpuInfo],
    notes: list[str],
) -> int | None:
    """-1 (all layers) when the full offload fits the free VRAM of `devices`."""
    free = {g.index: g.memory_free_mib * 1024 * 1024 for g in gpus}
    if not all(d in free for d in devices):
        notes.append("GPU memory unknown here; gpu.layers left to llama-server")
        return None
    need = estimate(info, ctx, parallel, None).per_device(devices)
    if all(need[d] <= free[d] for d in devices):
        notes.append(
            f"all {info.layers} layers on the GPU ({human_bytes(sum(need.values()))} estimated)"
        )
        return -1
    notes.append(
        f"the whole model ({human_bytes(sum(need.values()))}) does not fit the free VRAM; "
        "gpu.layers left to llama-server (set it to offload part)"
    )
    return None
