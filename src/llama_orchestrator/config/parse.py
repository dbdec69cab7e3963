"""Configs from text and back: parsing with messages a user can act on,
atomic saving, secrets hidden. Parsing takes text; finding the file is the
caller's business, so the same functions serve `config validate`, `up` and
the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llama_orchestrator.config.instance import InstanceConfig
from llama_orchestrator.config.settings import Settings
from llama_orchestrator.config.upstream import UpstreamConfig
from llama_orchestrator.errors import ConfigError, Problem
from llama_orchestrator.files import atomic_write_text
from llama_orchestrator.gpus.backends import BACKENDS
from llama_orchestrator.home import is_upstream

__all__ = [
    "pydantic_problems",
    "parse_config",
    "parse_upstream",
    "is_upstream",
    "parse_settings",
    "load_config",
    "salvage_config",
    "load_settings",
    "load_settings_leniently",
    "save_config",
    "redacted",
    "is_secret_name",
]


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
            said = err["msg"].removeprefix("Value error, ")  # our validators' own sentence
            msg = f"{said} (got {json.dumps(err['input'], default=str)})"
        problems.append(Problem(file, field, msg))
    return problems


def _parse_json(text: str, file: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [Problem(file, "", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")]
        ) from None


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


def salvage_config(text: str) -> InstanceConfig | None:
    """What is left of a config that fails its schema once the fields at fault
    are taken out (their defaults stand in), so that `config validate` checks
    the rest in the same pass: the model file, the port, the GPUs. None when
    a required field is what is wrong, or the text is not a JSON object."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or is_upstream(data):
        return None
    data.pop("name", None)  # a name unlike the folder's is a problem of its own
    return _salvage(InstanceConfig, data)


def _salvage(model: Any, data: dict[str, Any]) -> Any:
    """`model` validated from `data` without the values at fault, or None."""
    for _ in range(8):  # each round takes out what the last one found
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors()
            if any(e["type"] == "missing" for e in errors):
                return None
            if not any([_drop(data, e["loc"]) for e in errors]):
                return None
    return None


def _drop(data: Any, loc: tuple[int | str, ...]) -> bool:
    """Take the value at `loc` out of `data`; False when there is none."""
    if not loc:
        return False
    node = data
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    try:
        del node[loc[-1]]
    except (KeyError, IndexError, TypeError):
        return False
    return True


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


def load_settings_leniently(path: Path) -> tuple[Settings, list[Problem]]:
    """The settings, and what is wrong with them: for the commands that only
    look (`ps`, `logs` ...), which must work while `llama-orch.json` has a
    typo. What is at fault is left at its default."""
    try:
        return load_settings(path), []
    except ConfigError as exc:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        kept = _salvage(Settings, data) if isinstance(data, dict) else None
        return kept or Settings(), exc.problems


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
