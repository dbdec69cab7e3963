"""An instance's config (`instances/<name>/config.json`, DESIGN §2): the
model, server, GPU, health check, restart policy and on-demand sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from llama_orchestrator.config.section import Section
from llama_orchestrator.home import NAME_RE

__all__ = [
    "Backend",
    "RestartMode",
    "ModelSection",
    "ServerSection",
    "GpuSection",
    "HealthcheckSection",
    "RestartPolicySection",
    "OnDemandSection",
    "PlacementSection",
    "InstanceConfig",
]


Backend = Literal["cpu", "cuda", "rocm", "vulkan", "sycl", "metal"]
RestartMode = Literal["no", "on-failure", "always", "unless-stopped"]


class ModelSection(Section):
    path: str = Field(
        description="Path to the GGUF file (relative paths resolve against the config file's "
        "folder), or a pulled model's reference: hf://OWNER/REPO:QUANT."
    )
    context_size: int = Field(
        4096,
        ge=0,
        description="Context size in tokens (-c); 0 lets llama-server use the model's own.",
    )
    batch_size: int | None = Field(None, ge=1, description="Logical batch size (-b).")
    threads: int | None = Field(None, ge=1, description="CPU threads for generation (-t).")
    alias: str | None = Field(
        None,
        description="The model name clients ask the router for; defaults to the instance name.",
    )


class ServerSection(Section):
    host: str = Field(
        "127.0.0.1",
        description="Address llama-server listens on. Anything but loopback exposes it to the network.",
    )
    port: int = Field(
        ge=1, le=65535, description="TCP port llama-server listens on; unique per host."
    )
    parallel: int = Field(1, ge=1, description="Number of parallel request slots (-np).")

    @field_validator("host")
    @classmethod
    def _one_host(cls, v: str) -> str:
        # llama-server binds one address: "127.0.0.1,::1" would pass here and
        # then fail to bind at `up` as a port "in use"
        if not v.strip() or any(c in v for c in ", \t/"):
            raise ValueError(
                "give one address or host name (e.g. 127.0.0.1 or ::1); llama-server listens on one"
            )
        return v

    api_key: str | None = Field(
        None,
        description="API key llama-server requires; passed through the environment, never argv.",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="More llama-server arguments, one list item per argv word (never a shell string).",
    )


class GpuSection(Section):
    backend: Backend = Field(
        "cpu",
        description="The llama.cpp backend to pin devices for: cpu, cuda, rocm, vulkan, sycl or metal.",
    )
    device_id: int | list[int] | Literal["auto"] | None = Field(
        None,
        description="GPU index, a list of indices for a model split over several cards, or "
        "`auto`: at each start, the card(s) with the most free VRAM that hold the model.",
    )
    layers: int | None = Field(
        None,
        ge=-1,
        description="Layers to offload to the GPU (-ngl); omitted means llama-server's default.",
    )
    split_mode: Literal["none", "layer", "row", "tensor"] | None = Field(
        None, description="How a model is split over several GPUs (-sm)."
    )
    tensor_split: list[float] | None = Field(
        None, description="Share of the model per pinned GPU, in device order (-ts), e.g. [3, 1]."
    )
    vram_mib: int | None = Field(
        None,
        gt=0,
        description="MiB this instance needs on each pinned GPU, instead of the estimate from the "
        "model file (fit checks and on-demand swapping use it; measure with `llama-orch gpus`).",
    )
    force: bool | None = Field(
        None,
        description="true: pin device_id even when GPU discovery (NVML, nvidia-smi, rocm-smi) finds no "
        "card at all, e.g. in a container without the driver's tools.",
    )

    @field_validator("device_id")
    @classmethod
    def _non_negative(cls, v: int | list[int] | str | None) -> int | list[int] | str | None:
        ids = [v] if isinstance(v, int) else (v if isinstance(v, list) else [])
        if any(i < 0 for i in ids):
            raise ValueError("GPU indices are 0 or more")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError("a GPU index appears twice")
        return v

    @property
    def auto(self) -> bool:
        return self.device_id == "auto"

    @property
    def devices(self) -> list[int]:
        """The pinned indices; empty when unpinned or `auto` (chosen at start),
        and for backend cpu, which uses no card whatever device_id says (so it
        holds none against a plan's script task, nor counts on one)."""
        if self.backend == "cpu":
            return []
        if isinstance(self.device_id, int):
            return [self.device_id]
        return list(self.device_id) if isinstance(self.device_id, list) else []


class HealthcheckSection(Section):
    interval: float = Field(10, gt=0, description="Seconds between health probes.")
    timeout: float = Field(
        5, gt=0, description="Seconds a probe may take before it counts as a failure."
    )
    retries: int = Field(
        3, ge=1, description="Consecutive failures before the instance is unhealthy."
    )
    start_period: float = Field(
        120,
        ge=0,
        description="Seconds after start during which a loading model (503) or a refused connection is not a failure.",
    )
    probe: Literal["health", "completion"] = Field(
        "health",
        description="`health` probes GET /health; `completion` also sends a 1-token completion every deep_interval.",
    )
    deep_interval: float = Field(
        60, gt=0, description="Seconds between completion probes when probe is `completion`."
    )
    load_timeout: float = Field(
        600,
        gt=0,
        description="Seconds a model may load (503) without its log showing progress; past start_period a load that progresses is never a failure.",
    )


class RestartPolicySection(Section):
    enabled: bool = Field(True, description="Original format: false means mode `no`.")
    mode: RestartMode | None = Field(
        None,
        description="no | on-failure | always | unless-stopped, as Docker's; default on-failure (or no when enabled is false).",
    )
    max_retries: int = Field(
        5,
        ge=0,
        description="Restarts before the instance is `failed` and stays down until `up` or `restart`.",
    )
    backoff_initial: float = Field(
        1, ge=0, description="Seconds before the first restart; doubles with each further one."
    )
    backoff_max: float = Field(60, ge=0, description="Upper bound of the restart delay in seconds.")
    reset_after: float = Field(
        60, ge=0, description="Seconds an instance must stay up for its restart count to reset."
    )

    @property
    def effective_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        return "on-failure" if self.enabled else "no"


class OnDemandSection(Section):
    idle_ttl: float = Field(
        300, gt=0, description="Seconds without requests after which the router stops the instance."
    )
    load_timeout: float = Field(
        300, gt=0, description="Seconds a request waits for the model to load."
    )
    group: str | None = Field(
        None, description="Swap group: at most `max_running` members run at once."
    )


class PlacementSection(Section):
    node: str | None = Field(
        None,
        min_length=1,
        description="In a cluster home: the node (its `ray start --node-name`) this instance runs "
        "on, always; with gpu.device_id, on exactly those cards. Unset: the daemon picks a node "
        "with room.",
    )


class InstanceConfig(Section):
    """One llama-server instance: `instances/<name>/config.json`."""

    name: str | None = Field(
        None, description="Instance name; must match the folder name when given."
    )
    model: ModelSection
    server: ServerSection
    gpu: GpuSection = Field(default_factory=GpuSection)
    healthcheck: HealthcheckSection = Field(default_factory=HealthcheckSection)
    restart_policy: RestartPolicySection = Field(default_factory=RestartPolicySection)
    stop_timeout: float = Field(
        10,
        ge=0,
        description="Seconds between the graceful stop signal and killing the process tree.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for llama-server."
    )
    binary: str | None = Field(
        None,
        description="The llama-server executable for this instance (overrides every other lookup).",
    )
    tags: list[str] = Field(
        default_factory=list,
        description="Tags that plans and the router can select by (`tags:worker`).",
    )
    autostart: bool = Field(False, description="Start with the daemon / service.")
    yield_to_scripts: bool = Field(
        False,
        description="When idle, stop for a plan's script task that needs its GPU, and start again when the task ends.",
    )
    on_demand: OnDemandSection | None = Field(
        None, description="Started by the router on first request and stopped when idle."
    )
    placement: PlacementSection | None = Field(
        None, description="Where it runs in a cluster home (`cluster` in llama-orch.json)."
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError("use lowercase letters, digits, '.', '_' or '-' (max 63)")
        return v

    def alias_or(self, name: str) -> str:
        return self.model.alias or name

    def digest(self) -> str:
        """What the config says, as a short hash: the same for the same settings
        however the file is laid out (defaults left out, so a new version of
        llama-orch that adds a setting does not look like a change)."""
        import hashlib

        text = self.model_dump_json(exclude_defaults=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
