"""The typed rows of the state database, and how a row becomes SQL (pure)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from llama_orchestrator.states import Desired, InstanceState

__all__ = ["InstanceRow", "Lease", "UsageRecord", "Event", "INSERT_EVENT", "save_sql", "COLUMNS"]


@dataclass
class InstanceRow:
    """Runtime facts about one instance (its config lives in config.json)."""

    name: str
    desired: Desired = Desired.STOPPED
    state: InstanceState = InstanceState.CREATED
    pid: int | None = None
    create_time: float | None = None
    host: str | None = None
    port: int | None = None
    started_at: float | None = None
    exited_at: float | None = None
    exit_code: int | None = None
    restarts: int = 0
    last_exit: dict[str, Any] | None = None
    supervised: bool = False
    next_restart_at: float | None = None
    updated_at: float = 0.0
    gpu_devices: list[int] | None = None
    streak: int = 0  # restarts since the instance last stayed up reset_after seconds
    last_used_at: float | None = None  # an on-demand instance's last request (the daemon writes it)
    config_digest: str | None = None  # InstanceConfig.digest() of the config it was started with
    #: the cluster node its process runs on (None: this machine)
    node: str | None = None

    @classmethod
    def from_sql(cls, r: sqlite3.Row) -> InstanceRow:
        d = dict(r)
        d["desired"] = Desired(d["desired"])
        d["state"] = InstanceState(d["state"])
        for key in _JSON_COLUMNS:
            d[key] = json.loads(d[key]) if d[key] else None
        d["supervised"] = bool(d["supervised"])
        return cls(**d)


COLUMNS = tuple(f.name for f in fields(InstanceRow))
_SAVED = tuple(c for c in COLUMNS if c != "last_used_at")
_JSON_COLUMNS = ("last_exit", "gpu_devices")


@dataclass
class Lease:
    """One card leased to a plan's script task (DESIGN §7): `state` is
    "yielding" (the instances on it being stopped) or "active" (the script
    runs); `yielded`, the instances stopped for it, restored when it ends."""

    gpu: int
    run_id: str
    task_id: str
    since: float
    state: str = "yielding"
    yielded: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class UsageRecord:
    """One request to an external upstream: its tokens and what they cost
    (`run_id`/`task_id`: the plan task that sent it)."""

    ts: float
    upstream: str
    model: str
    run_id: str | None
    task_id: str | None
    tokens_in: int
    tokens_out: int
    cost: float


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    instance: str | None
    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "id"}


def _sql_value(key: str, value: Any) -> Any:
    if key in _JSON_COLUMNS:
        return json.dumps(value) if value is not None else None
    if isinstance(value, (InstanceState, Desired)):
        return value.value
    if isinstance(value, bool):
        return int(value)
    return value


def save_sql(row: InstanceRow) -> tuple[str, tuple[Any, ...]]:
    values = tuple(_sql_value(c, getattr(row, c)) for c in _SAVED)
    cols = ", ".join(_SAVED)
    marks = ", ".join("?" for _ in _SAVED)
    updates = ", ".join(f"{c} = excluded.{c}" for c in _SAVED if c != "name")
    sql = f"INSERT INTO instances ({cols}) VALUES ({marks}) ON CONFLICT (name) DO UPDATE SET {updates}"
    return sql, values


INSERT_EVENT = "INSERT INTO events (ts, instance, kind, message, data) VALUES (?, ?, ?, ?, ?)"
