"""The home's settings (`llama-orch.json`, DESIGN §2): router, logs, GPUs,
groups, loads, models and peers."""

from __future__ import annotations

from pydantic import Field, field_validator

from llama_orchestrator.config.section import Section
from llama_orchestrator.errors import UserError
from llama_orchestrator.home import NAME_RE

__all__ = [
    "RouterSettings",
    "LogSettings",
    "GpuSettings",
    "GroupSettings",
    "LoadSettings",
    "ModelSettings",
    "PeerSettings",
    "ClusterSettings",
    "Settings",
]


class RouterSettings(Section):
    host: str = Field(
        "127.0.0.1",
        description="Address the router listens on; several, comma-separated, as "
        'llama-server takes them ("127.0.0.1,::1"). Beyond loopback, api_keys are required.',
    )
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
        "served and whose browsers may read the answers (CORS); a request a browser sends "
        "from any other page is refused (a page could spend your GPUs), unless it carries "
        'an API key. "*" allows every page (sensible only with api_keys).',
    )
    model_map: dict[str, str] = Field(
        default_factory=dict,
        description="Model names clients hard-code, mapped to ours: "
        '{"gpt-4o-mini": "qwen"} sends requests for gpt-4o-mini to the instances of qwen.',
    )
    strict_models: bool = Field(
        False,
        description="Refuse (404) a request naming an unknown model even when one model is "
        "served; by default it goes to that model, as llama-server itself answers.",
    )
    model_control: bool = Field(
        True,
        description="Let clients of the router load and unload models (POST /models/load and "
        "/models/unload, as llama-server's own router mode and its web UI do): a load starts "
        "the instances of the model, an unload stops them. Behind api_keys when they are set.",
    )

    @field_validator("host")
    @classmethod
    def _hosts(cls, v: str) -> str:
        parts = [p.strip() for p in v.split(",")]
        if not all(parts) or any(c in p for p in parts for c in " \t/"):
            raise ValueError('give an address, or several comma-separated ("127.0.0.1,::1")')
        return ",".join(parts)

    def hosts(self) -> list[str]:
        """The addresses to listen on, in the order given."""
        return [h.strip("[]") for h in self.host.split(",")]

    max_connections: int = Field(
        1024,
        ge=1,
        description="Client connections at once (also capped by the open-files limit, keeping a "
        "reserve for the control socket); at the cap the most stalled one is closed.",
    )


class LogSettings(Section):
    max_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Size at which an instance log is rotated."
    )
    backups: int = Field(3, ge=0, description="Rotated files kept (.1 .2 ...).")


class GpuSettings(Section):
    sample_interval: float = Field(5, gt=0)
    temp_threshold: float = 85


class GroupSettings(Section):
    max_running: int = Field(
        1, ge=1, description="Members of this on-demand group that may run at once."
    )


class LoadSettings(Section):
    max_concurrent: int = Field(
        1,
        ge=0,
        description="Models the daemon loads at once (0: no limit); the other starts wait their turn, shown as `queued`. One by default: parallel loads share one disk and one PCIe bus, and on a riser rig each slows the others past their start_period.",
    )


class ModelSettings(Section):
    dir: str | None = Field(
        None,
        description="Where `models pull` puts models (relative to the home); default <home>/models.",
    )


class PeerSettings(Section):
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


class ClusterSettings(Section):
    """A Ray cluster that runs this home's instances (the `ray` extra; docs/scaling.md)."""

    address: str = Field(
        description='The cluster\'s head, as `ray start` printed it ("10.0.0.1:6379"), or "auto" '
        "(the cluster this machine is a node of). Its token comes from Ray's own places "
        "($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), never from llama-orch's files."
    )
    namespace: str | None = Field(
        None,
        pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$",
        description="The Ray namespace of this home's instances; default llama-orch-<folder name>. "
        "Two homes on one cluster need different ones.",
    )
    node_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds a node may leave the daemon's calls unanswered before it is taken for "
        "lost: its unpinned instances start again elsewhere, the pinned ones wait for it.",
    )
    call_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a start or a stop on a node may take before it is given up.",
    )

    @field_validator("address")
    @classmethod
    def _valid_address(cls, v: str) -> str:
        host, _, port = v.rpartition(":")
        if v != "auto" and (not host or not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError('use the head\'s HOST:PORT ("10.0.0.1:6379") or "auto"')
        return v


class Settings(Section):
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
    cluster: ClusterSettings | None = Field(
        None,
        description="Run this home's instances on a Ray cluster's nodes instead of this machine "
        "(pip install 'llama-orch[ray]'; docs/scaling.md).",
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
