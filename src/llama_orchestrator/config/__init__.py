"""Instance configs and global settings: pydantic models, parsing with
messages a user can act on, and atomic saving (DESIGN §1, §2).

Parsing takes text; finding the file is the caller's business, so the same
functions serve `config validate`, `up` and the tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llama_orchestrator.errors import ConfigError, Problem, UserError
from llama_orchestrator.files import atomic_write_text
from llama_orchestrator.gpus.backends import BACKENDS
from llama_orchestrator.home import NAME_RE
from llama_orchestrator.models.catalog import is_ref, resolve_local

__all__ = [
    "Backend",
    "BACKENDS",
    "InstanceConfig",
    "UpstreamConfig",
    "Settings",
    "parse_config",
    "parse_upstream",
    "is_upstream",
    "parse_settings",
    "load_config",
    "load_settings",
    "save_config",
    "atomic_write_text",
    "redacted",
    "is_secret_name",
]

Backend = Literal["cpu", "cuda", "rocm", "vulkan", "sycl", "metal"]
RestartMode = Literal["no", "on-failure", "always", "unless-stopped"]


class _Section(BaseModel):
    # defer_build: schemas are built on first use, not at import (~90 ms off every command)
    model_config = ConfigDict(extra="forbid", defer_build=True)


class ModelSection(_Section):
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


class ServerSection(_Section):
    host: str = Field(
        "127.0.0.1",
        description="Address llama-server listens on. Anything but loopback exposes it to the network.",
    )
    port: int = Field(
        ge=1, le=65535, description="TCP port llama-server listens on; unique per host."
    )
    parallel: int = Field(1, ge=1, description="Number of parallel request slots (-np).")
    api_key: str | None = Field(
        None,
        description="API key llama-server requires; passed through the environment, never argv.",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="More llama-server arguments, one list item per argv word (never a shell string).",
    )


class GpuSection(_Section):
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
        """The pinned indices; empty when unpinned or `auto` (chosen at start)."""
        if isinstance(self.device_id, int):
            return [self.device_id]
        return list(self.device_id) if isinstance(self.device_id, list) else []


class HealthcheckSection(_Section):
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


class RestartPolicySection(_Section):
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


class OnDemandSection(_Section):
    idle_ttl: float = Field(
        300, gt=0, description="Seconds without requests after which the router stops the instance."
    )
    load_timeout: float = Field(
        300, gt=0, description="Seconds a request waits for the model to load."
    )
    group: str | None = Field(
        None, description="Swap group: at most `max_running` members run at once."
    )


class InstanceConfig(_Section):
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

    def model_path(self, config_dir: Path) -> Path:
        """The model file, relative paths resolved against the config's folder;
        an `hf://` reference is the file the home's catalog has for it (the
        reference itself, which exists nowhere, while it is not pulled)."""
        if is_ref(self.model.path):
            # instances/<name>/config.json: the home is two folders up
            return resolve_local(config_dir.parent.parent, self.model.path) or Path(self.model.path)
        p = Path(self.model.path).expanduser()
        return p if p.is_absolute() else (config_dir / p).resolve()


class PriceSection(_Section):
    input_per_mtok: float = Field(0, ge=0, description="Price of a million prompt tokens.")
    output_per_mtok: float = Field(0, ge=0, description="Price of a million generated tokens.")


class BudgetSection(_Section):
    per_day: float = Field(
        gt=0,
        description="What the upstream may cost in any 24 hours (in the price's currency); "
        "past it, its requests get 429 until older spending leaves the window.",
    )


class UpstreamSection(_Section):
    url: str = Field(
        description="The API's base URL, up to /v1: https://api.example.com/v1 (OpenAI-compatible)."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable (of the daemon) that holds the key."
    )
    api_key_file: str | None = Field(
        None,
        description="File that holds the key (relative to the config's folder); read at each request.",
    )
    model: str | None = Field(
        None, description="The model name the API knows; defaults to the alias."
    )
    max_concurrent: int = Field(4, ge=1, description="Requests in flight to it at once.")
    requests_per_minute: float | None = Field(
        None, gt=0, description="Requests it may get in any minute (then 429 + Retry-After)."
    )
    price: PriceSection = Field(default_factory=PriceSection)
    budget: BudgetSection | None = None

    @field_validator("url")
    @classmethod
    def _valid_url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("use an http:// or https:// URL such as https://api.example.com/v1")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _valid_env(cls, v: str | None) -> str | None:
        if v is not None and not v.replace("_", "").isalnum():
            raise ValueError("name an environment variable (letters, digits, '_'), not a key")
        return v


class UpstreamHealth(_Section):
    interval: float = Field(30, gt=0, description="Seconds between `GET /models` checks.")
    timeout: float = Field(10, gt=0, description="Seconds a check may take.")
    retries: int = Field(1, ge=1, description="Failed checks in a row that make it unhealthy.")


class UpstreamConfig(_Section):
    """An OpenAI-compatible API the router sends requests to, not a process of
    ours: `instances/<name>/config.json` with `upstream` instead of `model`."""

    name: str | None = Field(
        None, description="Instance name; must match the folder name when given."
    )
    alias: str | None = Field(
        None, description="The model name clients and plans ask for; defaults to the name."
    )
    tags: list[str] = Field(default_factory=list)
    upstream: UpstreamSection
    healthcheck: UpstreamHealth = Field(default_factory=UpstreamHealth)

    def alias_or(self, name: str) -> str:
        return self.alias or name

    def remote_model(self, name: str) -> str:
        return self.upstream.model or self.alias_or(name)


class RouterSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    batch_api_keys: list[str] = Field(
        default_factory=list,
        description="Keys whose requests are batch work: served after interactive ones (at least one freed slot in four goes to batch).",
    )
    max_queue: int = Field(64, ge=0)
    queue_timeout: float = Field(30, ge=0)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1)
    header_timeout: float = Field(
        60, gt=0, description="Seconds a request head may take to arrive whole (then 408)."
    )
    body_timeout: float = Field(
        60, gt=0, description="Seconds a request body may pause between two parts (then 408)."
    )
    send_timeout: float = Field(
        60, gt=0, description="Seconds a client may read none of its answer before it is dropped."
    )
    keepalive_timeout: float = Field(
        75, gt=0, description="Seconds an idle client connection stays open between requests."
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Web pages (origins such as http://localhost:5173) whose requests are "
        "served; a request a browser sends from any other page is refused (a page could "
        "spend your GPUs), unless it carries an API key.",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        description="Client connections at once (also capped by the open-files limit, keeping a "
        "reserve for the control socket); at the cap the most stalled one is closed.",
    )


class LogSettings(_Section):
    max_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Size at which an instance log is rotated."
    )
    backups: int = Field(3, ge=0, description="Rotated files kept (.1 .2 ...).")


class GpuSettings(_Section):
    sample_interval: float = Field(5, gt=0)
    temp_threshold: float = 85


class GroupSettings(_Section):
    max_running: int = Field(
        1, ge=1, description="Members of this on-demand group that may run at once."
    )


class LoadSettings(_Section):
    max_concurrent: int = Field(
        1,
        ge=0,
        description="Models the daemon loads at once (0: no limit); the other starts wait their turn, shown as `queued`. One by default: parallel loads share one disk and one PCIe bus, and on a riser rig each slows the others past their start_period.",
    )


class ModelSettings(_Section):
    dir: str | None = Field(
        None,
        description="Where `models pull` puts models (relative to the home); default <home>/models.",
    )


class PeerSettings(_Section):
    """Another machine's llama-orch router, whose models this router also serves."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$",
        description="What the peer is called here (ps, /v1/models, a plan task's `host`).",
    )
    url: str = Field(
        description="Its router: http://10.0.0.2:8080 (router.host there must be reachable from here)."
    )
    api_key_file: str | None = Field(
        None,
        description="File holding the key this machine presents to the peer (one of the peer's "
        "router.api_keys), relative to the home; read at each refresh.",
    )
    api_key_env: str | None = Field(
        None, description="Environment variable (of the daemon) holding that key."
    )
    ssh: str | None = Field(
        None,
        description="How this daemon reaches the peer's own daemon, for plan tasks that name "
        "it as their host: ssh://user@host/path/to/home, or a context's name "
        "(`llama-orch context create`); the daemon's user needs a key the peer accepts.",
    )
    refresh: float = Field(
        1.0, gt=0, description="Seconds between looks at the peer's models and free slots."
    )
    timeout: float = Field(
        2.0, gt=0, description="Seconds a look may take before the peer is skipped."
    )

    @field_validator("url")
    @classmethod
    def _valid_url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
            raise ValueError("use the peer router's http:// address, e.g. http://10.0.0.2:8080")
        return v.rstrip("/")

    @field_validator("ssh")
    @classmethod
    def _valid_ssh(cls, v: str | None) -> str | None:
        if v is None or not v.startswith("ssh://"):
            if v is not None and not NAME_RE.match(v):
                raise ValueError("use ssh://user@host/path/to/home, or a context's name")
            return v
        from llama_orchestrator.hosts.ssh import parse_target

        try:
            parse_target(v)
        except UserError as exc:
            raise ValueError(exc.message) from None
        return v


class Settings(_Section):
    """Global settings: `<home>/llama-orch.json` (all optional)."""

    router: RouterSettings = Field(default_factory=RouterSettings)
    groups: dict[str, GroupSettings] = Field(
        default_factory=dict,
        description='On-demand swap groups (`on_demand.group`): {"big": {"max_running": 1}}; '
        "a group not listed runs one member at a time.",
    )
    logs: LogSettings = Field(default_factory=LogSettings)
    gpu: GpuSettings = Field(default_factory=GpuSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    loads: LoadSettings = Field(default_factory=LoadSettings)
    peers: list[PeerSettings] = Field(
        default_factory=list,
        description="Other machines' routers: their models are served here too, each request "
        "to the least busy replica wherever it runs.",
    )

    @field_validator("peers")
    @classmethod
    def _unique_peers(cls, v: list[PeerSettings]) -> list[PeerSettings]:
        names = [p.name for p in v]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"peer names must differ ({', '.join(dup)} is given twice)")
        for p in v:
            if p.api_key_env and p.api_key_file:
                raise ValueError(f"peer '{p.name}': give api_key_env or api_key_file, not both")
        return v


# --- parsing -----------------------------------------------------------------

_FIX_HINTS = {
    "extra_forbidden": "unknown field; remove it or fix its spelling",
    "missing": "required field is missing; add it",
}


def pydantic_problems(file: str, exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"])
        hint = _FIX_HINTS.get(err["type"])
        if err["type"] == "literal_error" and err["loc"][-1] == "backend":
            msg = f"unknown backend {err['input']!r}; use one of {', '.join(BACKENDS)}"
        elif hint:
            msg = hint
        else:
            msg = f"{err['msg']} (got {json.dumps(err['input'], default=str)})"
        problems.append(Problem(file, field, msg))
    return problems


def _parse_json(text: str, file: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [Problem(file, "", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")]
        ) from None


def is_upstream(data: Any) -> bool:
    """A config's JSON that declares an upstream, not a llama-server."""
    return isinstance(data, dict) and "upstream" in data


def parse_config(text: str, file: str, name: str) -> InstanceConfig:
    """Parse one instance config; raise ConfigError listing every problem."""
    data = _parse_json(text, file)
    if not isinstance(data, dict):
        raise ConfigError([Problem(file, "", "the config must be a JSON object {...}")])
    if is_upstream(data):
        raise ConfigError(
            [
                Problem(
                    file,
                    "upstream",
                    f"'{name}' is an upstream (an API the router sends requests to), not a "
                    "llama-server: there is nothing of it to start, stop or restart",
                )
            ]
        )
    return _checked(InstanceConfig, data, file, name)


def parse_upstream(text: str, file: str, name: str) -> UpstreamConfig:
    """Parse an upstream's config; raise ConfigError listing every problem."""
    data = _parse_json(text, file)
    cfg = _checked(UpstreamConfig, data, file, name)
    u = cfg.upstream
    if u.api_key_env and u.api_key_file:
        raise ConfigError([Problem(file, "upstream", "give api_key_env or api_key_file, not both")])
    return cfg


def _checked(model: Any, data: Any, file: str, name: str) -> Any:
    try:
        cfg = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(pydantic_problems(file, exc)) from None
    if cfg.name is not None and cfg.name != name:
        raise ConfigError(
            [
                Problem(
                    file,
                    "name",
                    f"'{cfg.name}' differs from the folder name '{name}'; "
                    "make them the same or remove the field",
                )
            ]
        )
    return cfg


def parse_settings(text: str, file: str) -> Settings:
    data = _parse_json(text, file)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(pydantic_problems(file, exc)) from None


def load_config(path: Path) -> InstanceConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), "", f"cannot be read: {exc.strerror}")]) from None
    return parse_config(text, str(path), path.parent.name)


def load_settings(path: Path) -> Settings:
    if not path.is_file():
        return Settings()
    return parse_settings(path.read_text(encoding="utf-8"), str(path))


# --- saving ------------------------------------------------------------------


def save_config(path: Path, cfg: InstanceConfig) -> None:
    data = cfg.model_dump(mode="json", exclude_none=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def redacted(cfg: InstanceConfig) -> dict[str, Any]:
    """The config as JSON data with secrets replaced, for describe/show/events."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    if data["server"].get("api_key"):
        data["server"]["api_key"] = "********"
    for key in list(data.get("env", {})):
        if is_secret_name(key):
            data["env"][key] = "********"
    return data


def is_secret_name(name: str) -> bool:
    """Environment variables whose values are never shown (API keys, tokens, passwords)."""
    return any(s in name.upper() for s in ("KEY", "TOKEN", "SECRET", "PASSWORD"))
