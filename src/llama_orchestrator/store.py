"""SQLite state: the one owner of `state/state.sqlite` (DESIGN §5, STYLE 10).

WAL mode, synchronous=FULL and BEGIN IMMEDIATE for read-then-write, so two
CLI processes (or the CLI and the daemon) serialise on the write lock and a
process killed at any moment loses nothing it committed. The schema version
lives in `PRAGMA user_version`; MIGRATIONS[i] upgrades version i to i+1.

A full disk does not stop the daemon's supervision: its stores share one
`Unsaved`, which keeps the instance rows and events the disk refused; every
read of the daemon sees them, and they are written with the next write that
succeeds (or by `flush`, which the daemon calls every few seconds). A CLI
command without the daemon gets the full-disk error instead.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llama_orchestrator.errors import DiskFull, StateError
from llama_orchestrator.files import disk_full, is_disk_full, private_dir
from llama_orchestrator.states import Desired, InstanceState, is_allowed

__all__ = [
    "Store",
    "Unsaved",
    "InstanceRow",
    "Event",
    "Lease",
    "UsageRecord",
    "SCHEMA_VERSION",
    "reset_state",
]

log = logging.getLogger("llama_orchestrator.daemon")

MIGRATIONS: list[str] = [
    # 0 -> 1: the first release
    """
    CREATE TABLE instances (
        name            TEXT PRIMARY KEY,
        desired         TEXT NOT NULL DEFAULT 'stopped',
        state           TEXT NOT NULL DEFAULT 'created',
        pid             INTEGER,
        create_time     REAL,
        host            TEXT,
        port            INTEGER,
        started_at      REAL,
        exited_at       REAL,
        exit_code       INTEGER,
        restarts        INTEGER NOT NULL DEFAULT 0,
        last_exit       TEXT,
        supervised      INTEGER NOT NULL DEFAULT 0,
        next_restart_at REAL,
        updated_at      REAL NOT NULL
    );
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        ts       REAL NOT NULL,
        instance TEXT,
        kind     TEXT NOT NULL,
        message  TEXT NOT NULL,
        data     TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_by_instance ON events (instance, id);
    CREATE INDEX events_by_ts ON events (ts);
    """,
    # 1 -> 2: the GPUs a run actually got (`device_id: auto` is chosen at each start)
    """
    ALTER TABLE instances ADD COLUMN gpu_devices TEXT;
    """,
    # 2 -> 3: restarts in a row (the backoff exponent), so a daemon that is
    # killed and started again resumes the count where it was
    """
    ALTER TABLE instances ADD COLUMN streak INTEGER NOT NULL DEFAULT 0;
    """,
    # 3 -> 4: plan runs (DESIGN §7) and their tasks, so a run survives the daemon
    """
    CREATE TABLE plan_runs (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        state       TEXT NOT NULL,
        created_at  REAL NOT NULL,
        finished_at REAL,
        source      TEXT NOT NULL,
        plan        TEXT NOT NULL
    );
    CREATE TABLE plan_tasks (
        run_id            TEXT NOT NULL,
        task_id           TEXT NOT NULL,
        idx               INTEGER NOT NULL,
        state             TEXT NOT NULL,
        attempts          INTEGER NOT NULL DEFAULT 0,
        not_before        REAL NOT NULL DEFAULT 0,
        started_at        REAL,
        finished_at       REAL,
        instance          TEXT,
        error             TEXT,
        prompt_tokens     INTEGER,
        completion_tokens INTEGER,
        pid               INTEGER,
        create_time       REAL,
        PRIMARY KEY (run_id, task_id)
    );
    """,
    # 4 -> 5: when an on-demand instance last served a request (its idle clock)
    """
    ALTER TABLE instances ADD COLUMN last_used_at REAL;
    """,
    # 5 -> 6: the cards discovery has reported, so a pinned card that is gone
    # is told apart from one that never was there
    """
    CREATE TABLE gpus_seen (
        backend TEXT NOT NULL,
        idx     INTEGER NOT NULL,
        name    TEXT,
        seen_at REAL NOT NULL,
        PRIMARY KEY (backend, idx)
    );
    """,
    # 6 -> 7: the config a running process was started with (its digest), so
    # ps can say a config was changed since: it takes effect at the next restart
    """
    ALTER TABLE instances ADD COLUMN config_digest TEXT;
    """,
    # 7 -> 8: the state `queued` (waiting for its turn to load), which an
    # older llama-orch cannot read; and the GPU leases of plans' script tasks,
    # so a daemon killed mid-lease gives the card back and restores what yielded
    """
    CREATE TABLE gpu_leases (
        gpu      INTEGER PRIMARY KEY,
        run_id   TEXT NOT NULL,
        task_id  TEXT NOT NULL,
        since    REAL NOT NULL,
        state    TEXT NOT NULL,
        yielded  TEXT NOT NULL DEFAULT '[]'
    );
    """,
    # 8 -> 9: what each request to an external upstream cost (`llama-orch
    # usage`, the daily budget), and which tier answered a plan's task
    """
    CREATE TABLE usage (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        ts         REAL NOT NULL,
        upstream   TEXT NOT NULL,
        model      TEXT NOT NULL,
        run_id     TEXT,
        task_id    TEXT,
        tokens_in  INTEGER NOT NULL,
        tokens_out INTEGER NOT NULL,
        cost       REAL NOT NULL
    );
    CREATE INDEX usage_by_ts ON usage (ts);
    ALTER TABLE plan_tasks ADD COLUMN tier TEXT;
    ALTER TABLE plan_tasks ADD COLUMN cost REAL;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


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

    @classmethod
    def from_sql(cls, r: sqlite3.Row) -> InstanceRow:
        d = dict(r)
        d["desired"] = Desired(d["desired"])
        d["state"] = InstanceState(d["state"])
        for key in _JSON_COLUMNS:
            d[key] = json.loads(d[key]) if d[key] else None
        d["supervised"] = bool(d["supervised"])
        return cls(**d)


_COLUMNS = tuple(f.name for f in fields(InstanceRow))
_SAVED = tuple(c for c in _COLUMNS if c != "last_used_at")
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


#: one write of a transaction, kept in case the disk refuses it:
#: ("row", InstanceRow) or ("event", (ts, instance, kind, message, data as JSON))
_Write = tuple[str, Any]


class Unsaved:
    """What the disk refused, kept in memory for every connection of one
    process (the daemon's): the newest row of each instance and the events,
    in order, until a write succeeds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, InstanceRow] = {}
        self._events: list[tuple[Any, ...]] = []
        self.since: float | None = None  # when the disk first refused
        self.error: DiskFull | None = None  # what it said last

    def __bool__(self) -> bool:
        return bool(self._rows or self._events)

    @property
    def changes(self) -> int:
        return len(self._rows) + len(self._events)

    def keep(self, writes: list[_Write], error: DiskFull, now: float) -> None:
        with self._lock:
            first = self.since is None
            for kind, value in writes:
                if kind == "row":
                    self._rows[value.name] = copy.deepcopy(value)
                else:
                    self._events.append(value)
            self.error = error
            if first:
                self.since = now
        if first:
            log.error(f"{error} The daemon goes on from memory and writes its state when it can.")

    def row(self, name: str) -> InstanceRow | None:
        with self._lock:
            row = self._rows.get(name)
        return copy.deepcopy(row) if row is not None else None

    def rows(self) -> list[InstanceRow]:
        with self._lock:
            return [copy.deepcopy(r) for r in self._rows.values()]

    def snapshot(self) -> tuple[dict[str, InstanceRow], list[tuple[Any, ...]]]:
        with self._lock:
            return dict(self._rows), list(self._events)

    def written(self, rows: dict[str, InstanceRow], events: int, now: float) -> None:
        """Forget what a flush wrote (rows kept since then stay)."""
        with self._lock:
            for name, row in rows.items():
                if self._rows.get(name) is row:
                    del self._rows[name]
            del self._events[:events]
            since, done = self.since, not self
            if done:
                self.since = self.error = None
        if done and since is not None:
            log.warning(
                f"The state database is written again, after {now - since:.0f}s "
                "of a full disk: nothing was lost."
            )

    def saved(self, name: str) -> None:
        """A newer row of `name` is on disk: the kept one is stale."""
        with self._lock:
            self._rows.pop(name, None)


class Store:
    """Typed access to the state database. Open with `Store.open(path)`;
    `unsaved` (the daemon's) keeps what a full disk refuses instead of failing."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        clock: Callable[[], float],
        unsaved: Unsaved | None = None,
    ) -> None:
        self._conn = conn
        self.path = path
        self.clock = clock
        self.unsaved = unsaved
        #: the writes of the transaction under way, and the full-disk error it met
        self._writes: list[_Write] | None = None
        self._full: DiskFull | None = None  # rows and events are only kept, not written
        self._failed = False  # a write of this transaction failed (SQLite may have undone it)
        self._raw = False  # it wrote other tables (`execute`)
        #: on_event(instance, kind, message, data) after each event is added (the daemon logs them)
        self.on_event: Callable[[str | None, str, str, dict[str, Any]], None] | None = None

    @classmethod
    def open(
        cls, path: Path, clock: Callable[[], float] = time.time, unsaved: Unsaved | None = None
    ) -> Store:
        try:
            private_dir(path.parent)
            if path.is_file() and path.stat().st_size == 0 and not _new(path):
                # SQLite would take it for a new database: a history lost in silence
                raise damaged(path, "the file is empty (0 bytes): its history is gone")
            conn = sqlite3.connect(path, timeout=15, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 15000")
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous = FULL")
            store = cls(conn, path, clock, unsaved)
            store._migrate()
            return store
        except (sqlite3.Error, OSError) as exc:
            raise _state_error(path, exc) from exc

    def close(self) -> None:
        self._conn.close()

    def _migrate(self) -> None:
        with self.transaction():
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"The state database {self.path} was written by a newer llama-orch "
                    f"(schema {version}, this one knows {SCHEMA_VERSION}).",
                    hint="Upgrade llama-orch.",
                )
            for i in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                self._conn.execute(f"PRAGMA user_version = {i + 1}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; nested use joins the outer transaction.
        With `unsaved`, the rows and events of a transaction the full disk
        refuses are kept in memory and it ends quietly; rows and events also
        queue behind those kept before, in order, until those are written.
        (Other writes are never kept: their callers get the error.)"""
        if self._writes is not None or self._conn.in_transaction:
            yield
            return
        behind = self.unsaved is not None and not self.flush()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _state_error(self.path, exc) from exc
        self._writes, self._raw, self._failed = [], False, False
        self._full = self.unsaved.error if behind and self.unsaved is not None else None
        try:
            try:
                yield
            except BaseException:
                self._rollback()
                raise
            writes, full, raw, refused = self._writes, self._full, self._raw, self._failed
            if refused:
                self._rollback()
            else:
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    self._rollback()
                    error = _state_error(self.path, exc)
                    if not isinstance(error, DiskFull) or self.unsaved is None:
                        raise error from exc
                    full, refused = error, True
        finally:
            self._writes, self._full = None, None
        if full is None:
            if self.unsaved is not None:
                for kind, value in writes:
                    if kind == "row":
                        self.unsaved.saved(value.name)
            return
        assert self.unsaved is not None
        self.unsaved.keep(writes, full, self.clock())
        if raw and refused:
            raise full  # what the other tables' writers asked for is not written

    def _rollback(self) -> None:
        if self._conn.in_transaction:  # SQLite may have rolled back itself (a full disk)
            self._conn.execute("ROLLBACK")

    def flush(self) -> bool:
        """Write what a full disk refused before; whether all of it is written now."""
        unsaved = self.unsaved
        if not unsaved:
            return True
        rows, events = unsaved.snapshot()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            for row in rows.values():
                self._conn.execute(*_save_sql(row))
            for event in events:
                self._conn.execute(_INSERT_EVENT, event)
            self._conn.execute("COMMIT")
        except sqlite3.Error:
            self._rollback()
            return False
        unsaved.written(rows, len(events), self.clock())
        return not unsaved

    def _write(self, sql: str, params: tuple[Any, ...], kept: _Write) -> None:
        """A write of a row or an event: inside a transaction, kept in case
        the disk refuses it (and, once it has, the rest are only kept)."""
        assert self._writes is not None
        self._writes.append(kept)
        if self._full is not None:
            return
        try:
            self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            error = _state_error(self.path, exc)
            if not isinstance(error, DiskFull) or self.unsaved is None:
                raise error from exc
            self._full, self._failed = error, True

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        """Raw SQL for the other tables' own modules (plans.records)."""
        self._raw = True
        return self._exec(sql, params)

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise _state_error(self.path, exc) from exc

    # --- instances -----------------------------------------------------------

    def get(self, name: str) -> InstanceRow | None:
        kept = self._kept(name)
        if kept is not None:
            return kept
        r = self._exec("SELECT * FROM instances WHERE name = ?", (name,)).fetchone()
        return InstanceRow.from_sql(r) if r else None

    def _kept(self, name: str) -> InstanceRow | None:
        """The row as written in this transaction or kept from a full disk,
        newest first (None: the disk's row is the newest)."""
        if self._full is not None:
            assert self._writes is not None
            for kind, value in reversed(self._writes):
                if kind == "row" and value.name == name:
                    return copy.deepcopy(value)
        return self.unsaved.row(name) if self.unsaved else None

    def get_or_new(self, name: str) -> InstanceRow:
        return self.get(name) or InstanceRow(name=name)

    def all(self) -> list[InstanceRow]:
        rows = {
            r["name"]: InstanceRow.from_sql(r)
            for r in self._exec("SELECT * FROM instances ORDER BY name").fetchall()
        }
        kept = [*(self.unsaved.rows() if self.unsaved else [])]
        if self._full is not None:
            assert self._writes is not None
            kept += [copy.deepcopy(v) for k, v in self._writes if k == "row"]
        for row in kept:
            rows[row.name] = row
        return [rows[name] for name in sorted(rows)]

    def save(self, row: InstanceRow) -> None:
        """Write the row; `last_used_at` only `mark_used` writes (the router's
        clock must not be set back by a row read a moment earlier)."""
        row.updated_at = self.clock()
        with self.transaction():
            self._write(*_save_sql(row), ("row", copy.deepcopy(row)))

    def mark_used(self, used: dict[str, float]) -> None:
        """When each named on-demand instance last served a request."""
        with self.transaction():
            for name, ts in used.items():
                self._exec("UPDATE instances SET last_used_at = ? WHERE name = ?", (ts, name))

    def delete(self, name: str) -> None:
        self._exec("DELETE FROM instances WHERE name = ?", (name,))
        if self.unsaved is not None:
            self.unsaved.saved(name)

    def set_state(
        self,
        row: InstanceRow,
        new: InstanceState,
        message: str,
        data: dict[str, Any] | None = None,
        **changes: Any,
    ) -> InstanceRow:
        """The one way a state changes: check the transition, apply `changes`,
        save the row and record the event, all in one transaction."""
        if not is_allowed(row.state, new):
            raise StateError(f"Instance {row.name}: illegal transition {row.state} -> {new}.")
        old = row.state
        for key, value in changes.items():
            if key not in _COLUMNS:
                raise TypeError(f"unknown column {key}")
            setattr(row, key, value)
        row.state = new
        with self.transaction():
            self.save(row)
            if old != new or data:
                self.add_event(row.name, new.value, message, {"from": old.value, **(data or {})})
        return row

    # --- events --------------------------------------------------------------

    def add_event(
        self, instance: str | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        event = (self.clock(), instance, kind, message, json.dumps(data or {}))
        with self.transaction():
            self._write(_INSERT_EVENT, event, ("event", event))
        if self.on_event is not None:
            self.on_event(instance, kind, message, data or {})

    def events(
        self,
        instance: str | None = None,
        since: float | None = None,
        after_id: int = 0,
        limit: int | None = None,
    ) -> list[Event]:
        sql = "SELECT * FROM events WHERE id > ?"
        params: list[Any] = [after_id]
        if instance is not None:
            sql += " AND instance = ?"
            params.append(instance)
        if since is not None:
            sql += " AND ts >= ?"
            params.append(since)
        if limit is not None:  # the newest `limit`, still returned oldest first
            sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT ?) ORDER BY id"
            params.append(limit)
        else:
            sql += " ORDER BY id"
        return self._events(sql, tuple(params))

    def mark_gpus_seen(self, cards: list[tuple[str, int, str]]) -> None:
        """Remember (backend, index, name) of cards discovery reports now."""
        if not cards:
            return
        with self.transaction():
            for backend, idx, name in cards:
                self._exec(
                    "INSERT INTO gpus_seen (backend, idx, name, seen_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (backend, idx) DO UPDATE SET name = excluded.name, "
                    "seen_at = excluded.seen_at",
                    (backend, idx, name, self.clock()),
                )

    def leases(self) -> list[Lease]:
        """Every card leased to a plan's script task, by index."""
        rows = self._exec("SELECT * FROM gpu_leases ORDER BY gpu").fetchall()
        return [
            Lease(
                r["gpu"],
                r["run_id"],
                r["task_id"],
                r["since"],
                r["state"],
                json.loads(r["yielded"]),
            )
            for r in rows
        ]

    def save_leases(self, leases: list[Lease]) -> None:
        """Record (or update) these leases, all in one transaction."""
        with self.transaction():
            for x in leases:
                self._exec(
                    "INSERT INTO gpu_leases (gpu, run_id, task_id, since, state, yielded) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (gpu) DO UPDATE SET "
                    "run_id = excluded.run_id, task_id = excluded.task_id, "
                    "since = excluded.since, state = excluded.state, yielded = excluded.yielded",
                    (x.gpu, x.run_id, x.task_id, x.since, x.state, json.dumps(x.yielded)),
                )

    def drop_leases(self, gpus: list[int]) -> None:
        with self.transaction():
            for gpu in gpus:
                self._exec("DELETE FROM gpu_leases WHERE gpu = ?", (gpu,))

    def add_usage(self, records: list[UsageRecord]) -> None:
        """What requests to upstreams cost, all in one transaction."""
        with self.transaction():
            for u in records:
                self.execute(
                    "INSERT INTO usage (ts, upstream, model, run_id, task_id, tokens_in, "
                    "tokens_out, cost) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        u.ts,
                        u.upstream,
                        u.model,
                        u.run_id,
                        u.task_id,
                        u.tokens_in,
                        u.tokens_out,
                        u.cost,
                    ),
                )

    def usage(self, since: float = 0.0) -> list[UsageRecord]:
        rows = self._exec("SELECT * FROM usage WHERE ts >= ? ORDER BY id", (since,)).fetchall()
        return [
            UsageRecord(
                r["ts"],
                r["upstream"],
                r["model"],
                r["run_id"],
                r["task_id"],
                r["tokens_in"],
                r["tokens_out"],
                r["cost"],
            )
            for r in rows
        ]

    def gpus_seen(self) -> set[int]:
        """Indices of every card discovery has ever reported in this home."""
        return {r["idx"] for r in self._exec("SELECT idx FROM gpus_seen").fetchall()}

    def latest_of_kinds(self, kinds: tuple[str, ...], limit: int = 500) -> list[Event]:
        """The newest events of these kinds, newest first."""
        marks = ", ".join("?" for _ in kinds)
        sql = f"SELECT * FROM events WHERE kind IN ({marks}) ORDER BY id DESC LIMIT ?"
        return self._events(sql, (*kinds, limit))

    def _events(self, sql: str, params: tuple[Any, ...]) -> list[Event]:
        rows = self._exec(sql, params).fetchall()
        return [
            Event(r["id"], r["ts"], r["instance"], r["kind"], r["message"], json.loads(r["data"]))
            for r in rows
        ]


_INSERT_EVENT = "INSERT INTO events (ts, instance, kind, message, data) VALUES (?, ?, ?, ?, ?)"


def _save_sql(row: InstanceRow) -> tuple[str, tuple[Any, ...]]:
    values = tuple(_sql_value(c, getattr(row, c)) for c in _SAVED)
    cols = ", ".join(_SAVED)
    marks = ", ".join("?" for _ in _SAVED)
    updates = ", ".join(f"{c} = excluded.{c}" for c in _SAVED if c != "name")
    sql = f"INSERT INTO instances ({cols}) VALUES ({marks}) ON CONFLICT (name) DO UPDATE SET {updates}"
    return sql, values


def _enable_wal(conn: sqlite3.Connection, timeout: float = 15.0) -> None:
    """Switch a new database to WAL (a no-op once it is).

    The switch needs an exclusive lock, and SQLite answers "database is locked"
    at once, without its busy handler, while another process is creating the
    same database (seen with two `up` at the same moment). So: retry briefly."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


#: SQLite's own result codes (sqlite3.Error.sqlite_errorcode on Python 3.11+)
_FULL, _CORRUPT, _NOTADB, _BUSY, _LOCKED = 13, 11, 26, 5, 6


def _state_error(path: Path, exc: BaseException) -> StateError:
    """Which fault it is, in words, and its fix: a damaged file is not a full disk."""
    detail = str(exc) or type(exc).__name__
    code = getattr(exc, "sqlite_errorcode", None)
    code = code & 0xFF if isinstance(code, int) else None  # extended codes share the low byte
    text = detail.lower()
    if path.is_dir():
        why = "it is a directory, not a database file"
        fix = f"Move {path} aside and run the command again."
    elif code in (_CORRUPT, _NOTADB) or "malformed" in text or "not a database" in text:
        return damaged(path, detail)
    elif code == _FULL or "disk is full" in text or is_disk_full(exc):
        return disk_full(path, f"The state database {path}")
    elif code in (_BUSY, _LOCKED) or "locked" in text or "busy" in text:
        why = "another llama-orch process held it for too long"
        fix = "Run the command again."
    else:
        why = detail
        fix = f"Check that {path.parent} exists and is writable."
    return StateError(f"The state database {path} cannot be used: {why}.", hint=fix)


def damaged(path: Path, what: str) -> StateError:
    return StateError(
        f"The state database {path} is damaged ({what}); nothing was changed.",
        hint="`llama-orch daemon start --reset-state` keeps it aside "
        f"({path.name}.corrupt-<time>) and starts a fresh one; it finds the llama-server "
        "processes still running by their marker, and adopts or stops them.",
    )


def reset_state(path: Path, now: float) -> Path | None:
    """Move the database (and its -wal, -shm) aside as `<name>.corrupt-<time>`,
    so the next open starts a fresh one; where it went, or None if there was none."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    kept = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            os.replace(src, kept.with_name(kept.name + suffix))
    return kept


def _new(path: Path) -> bool:
    """An empty file that a process is creating right now (opened, not yet
    written: the first open writes within milliseconds) is not a lost history."""
    return time.time() - path.stat().st_mtime < 5.0
