"""Build llama-server's argv and environment from a config (pure; DESIGN §3).

No I/O: the binary and model path are resolved by the caller, so every
decision here is tested without a process or a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.gpus.pinning import PIN_VARS, pin_env

__all__ = ["Launch", "build_launch", "MANAGED_FLAGS", "check_extra_args"]

#: Flags llama-orch sets itself; the same flag in extra_args would fight it.
MANAGED_FLAGS = {
    "-m": "model.path",
    "--model": "model.path",
    "--host": "server.host",
    "--port": "server.port",
    "-c": "model.context_size",
    "--ctx-size": "model.context_size",
    "-np": "server.parallel",
    "--parallel": "server.parallel",
    "--alias": "model.alias",
    "-a": "model.alias",
    "--api-key": "server.api_key",
    "--api-key-file": "server.api_key",
    "-ngl": "gpu.layers",
    "--gpu-layers": "gpu.layers",
    "--n-gpu-layers": "gpu.layers",
}

#: Marks a child as this home's instance, so it can be found again after a crash of ours.
INSTANCE_ENV = "LLAMA_ORCH_INSTANCE"
HOME_ENV = "LLAMA_ORCH_HOME"


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    #: Variables this launch set on top of the base environment (for describe).
    added_env: dict[str, str] = field(default_factory=dict)


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def check_extra_args(extra_args: list[str]) -> tuple[list[str], list[str]]:
    """Return (errors, warnings) about `server.extra_args`."""
    errors, warnings = [], []
    for i, arg in enumerate(extra_args):
        flag = _flag_name(arg)
        if arg.startswith("-") and len(flag.split()) > 1:
            # "--jinja --flash-attn on" as one item: llama-server takes it as one
            # unknown flag and exits at every start
            errors.append(
                f"'{arg}' is one argument holding several; give each flag and value "
                f"as its own item: {arg.split()}"
            )
            continue
        if flag in MANAGED_FLAGS:
            errors.append(
                f"{flag} is managed by llama-orch; set {MANAGED_FLAGS[flag]} in the config instead"
            )
        if flag == "--host":
            value = arg.split("=", 1)[1] if "=" in arg else (extra_args[i + 1 : i + 2] or [""])[0]
            if value in ("0.0.0.0", "::", "[::]"):
                warnings.append("--host 0.0.0.0 opens the server to the network")
    return errors, warnings


def build_launch(
    cfg: InstanceConfig,
    name: str,
    binary: Path,
    model_path: Path,
    base_env: Mapping[str, str],
    home: Path | None = None,
) -> Launch:
    """The exact argv and environment that start this instance."""
    m, s, g = cfg.model, cfg.server, cfg.gpu
    argv = [str(binary), "-m", str(model_path), "--host", s.host, "--port", str(s.port)]
    argv += ["-c", str(m.context_size)]
    if m.batch_size is not None:
        argv += ["-b", str(m.batch_size)]
    if m.threads is not None:
        argv += ["-t", str(m.threads)]
    argv += ["-np", str(s.parallel)]
    if g.backend == "cpu":
        argv += ["-ngl", "0"]
        if not {"--device", "-dev"} & {_flag_name(a) for a in s.extra_args}:
            # a GPU build still offloads big batches to a card it sees (checked
            # on an H100: 528 MiB taken by a "cpu" instance)
            argv += ["--device", "none"]
    elif g.layers is not None:
        argv += ["-ngl", "all" if g.layers < 0 else str(g.layers)]
    if g.split_mode is not None:
        argv += ["-sm", g.split_mode]
    if g.tensor_split:
        argv += ["-ts", ",".join(f"{x:g}" for x in g.tensor_split)]
    argv += ["--alias", cfg.alias_or(name), "--metrics"]
    argv += s.extra_args

    added: dict[str, str] = dict(cfg.env)
    pinned = PIN_VARS.get(g.backend) if g.devices else None
    for var, value in pin_env(g.backend, g.devices).items():
        if var == pinned:
            added[var] = value  # `gpu.devices` wins over the config's env
        else:
            added.setdefault(var, value)  # a default the config's env may change
    if s.api_key:
        added["LLAMA_API_KEY"] = s.api_key
    added[INSTANCE_ENV] = name
    if home is not None:
        added[HOME_ENV] = str(home)
    env = {**base_env, **added}
    return Launch(argv=argv, env=env, added_env=added)
