"""An external upstream's config: an OpenAI-compatible API the router sends
requests to like a replica, within its limits and budget (`upstreams`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from llama_orchestrator.config.section import Section

__all__ = ["PriceSection", "BudgetSection", "UpstreamSection", "UpstreamHealth", "UpstreamConfig"]


class PriceSection(Section):
    input_per_mtok: float = Field(0, ge=0, description="Price of a million prompt tokens.")
    output_per_mtok: float = Field(0, ge=0, description="Price of a million generated tokens.")


class BudgetSection(Section):
    per_day: float = Field(
        gt=0,
        description="What the upstream may cost in any 24 hours (in the price's currency); "
        "past it, its requests get 429 until older spending leaves the window.",
    )


class UpstreamSection(Section):
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


class UpstreamHealth(Section):
    interval: float = Field(30, gt=0, description="Seconds between `GET /models` checks.")
    timeout: float = Field(10, gt=0, description="Seconds a check may take.")
    retries: int = Field(1, ge=1, description="Failed checks in a row that make it unhealthy.")


class UpstreamConfig(Section):
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
