"""`init`: write a new instance config (atomically), choosing a free port."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llama_orchestrator import platform
from llama_orchestrator.config import InstanceConfig, pydantic_problems, save_config
from llama_orchestrator.errors import ConfigError, PortConflict, UserError
from llama_orchestrator.home import Home, check_name
from llama_orchestrator.validate import hosts_overlap, load_all

__all__ = ["create_instance", "pick_port", "FIRST_PORT"]

FIRST_PORT = 8001


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
    model: str,
    port: int | None = None,
    host: str = "127.0.0.1",
    backend: str = "cpu",
    gpus: list[int] | None = None,
    layers: int | None = None,
    ctx: int = 4096,
    parallel: int = 1,
    threads: int | None = None,
    alias: str | None = None,
    tags: list[str] | None = None,
    extra_args: list[str] | None = None,
    force: bool = False,
) -> Path:
    """Write `instances/NAME/config.json` and return its path.

    The model path is stored as given when absolute, else made absolute from
    the caller's working directory (a relative path in the file would be read
    against the config's folder, which is not what the user typed it against)."""
    check_name(name)
    path = home.config_path(name)
    if path.exists() and not force:
        raise UserError(
            f"Instance '{name}' already exists ({path}).",
            hint="Use --force to overwrite it, or pick another name.",
        )
    others = [x for x in load_all(home) if x.name != name and x.config is not None]
    taken = {
        x.config.server.port
        for x in others
        if x.config and hosts_overlap(x.config.server.host, host)
    }
    if port is None:
        port = pick_port(taken, lambda p: platform.port_is_free(host, p))
    elif port in taken:
        owner = next(x.name for x in others if x.config and x.config.server.port == port)
        raise PortConflict(
            f"Port {port} is already used by instance '{owner}'.",
            hint="Pick another --port, or leave it out to get a free one.",
        )
    gpu: dict[str, Any] = {"backend": backend}
    if gpus:
        gpu["device_id"] = gpus[0] if len(gpus) == 1 else gpus
    if layers is not None:
        gpu["layers"] = layers
    data: dict[str, Any] = {
        "name": name,
        "model": {"path": str(Path(model).expanduser().absolute()), "context_size": ctx},
        "server": {"host": host, "port": port, "parallel": parallel},
        "gpu": gpu,
    }
    if threads is not None:
        data["model"]["threads"] = threads
    if alias:
        data["model"]["alias"] = alias
    if extra_args:
        data["server"]["extra_args"] = list(extra_args)
    if tags:
        data["tags"] = list(tags)
    try:
        cfg = InstanceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(pydantic_problems(f"init {name}", exc)) from None
    save_config(path, cfg)
    return path
